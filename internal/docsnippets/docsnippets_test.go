// Package docsnippets_test keeps the SDK's documentation honest: every Go
// snippet of docs/sdk.md, docs/events.md and docs/sagas.md must appear, line for line, in an example (or
// other test file) that the test command compiles, so a snippet that
// stops compiling fails the build instead of misleading a reader.
package docsnippets_test

import (
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"beacon.dev/beacon/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

// normalize drops indentation, blank lines and runs of spaces (gofmt
// aligns comments differently at another depth).
func normalize(s string) string {
	var out []string
	for line := range strings.Lines(s) {
		if f := strings.Fields(line); len(f) > 0 {
			out = append(out, strings.Join(f, " "))
		}
	}
	return strings.Join(out, "\n")
}

// snippets returns the ```go blocks of a Markdown page.
func snippets(page string) []string {
	var out []string
	var cur []string
	in := false
	for line := range strings.Lines(page) {
		t := strings.TrimSpace(line)
		switch {
		case !in && t == "```go":
			in, cur = true, nil
		case in && t == "```":
			in = false
			out = append(out, strings.Join(cur, ""))
		case in:
			cur = append(cur, line)
		}
	}
	return out
}

// pages are the documentation pages whose Go snippets must be compiled,
// with how many snippets each has at least (a parser check).
var pages = map[string]int{"sdk.md": 10, "events.md": 4, "sagas.md": 1}

func TestEveryDocSnippetIsCompiled(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	var tests strings.Builder
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(path, "_test.go") {
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			tests.WriteString(normalize(string(b)) + "\n")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	compiled := tests.String()
	for name, least := range pages {
		page, err := os.ReadFile(filepath.Join(root, "docs", name))
		if err != nil {
			t.Fatal(err)
		}
		blocks := snippets(string(page))
		if len(blocks) < least {
			t.Fatalf("docs/%s has %d Go snippets; the parser must have missed some", name, len(blocks))
		}
		for i, b := range blocks {
			if !strings.Contains(compiled, normalize(b)) {
				t.Errorf("snippet %d of docs/%s is in no compiled example:\n%s", i+1, name, b)
			}
		}
	}
}
