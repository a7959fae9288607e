package server

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Consul's filter expressions (?filter=, the go-bexpr language), the part
// beacon serves on /v1/health/service and /v1/catalog/service:
//
//	selector == value | selector != value
//	selector contains value | selector not contains value   (Tags)
//	value in selector | value not in selector               (Tags, Meta keys)
//	selector is empty | selector is not empty
//	expr and expr | expr or expr | not expr | ( expr )
//
// Selectors: Service.ID, Service.Service, Service.Address, Service.Port,
// Service.Tags, Service.Meta.KEY (and Service.Meta for in/is empty),
// Node.Node, Node.Address, Node.Datacenter, Node.Meta.KEY. Values are
// "quoted" or bare words. Anything else is refused, naming what.

// Limits of a filter expression.
const (
	maxFilterLen   = 2048
	maxFilterDepth = 16
)

type consulFilter interface {
	match(e *consulEntry) bool
}

type (
	filterAnd struct{ a, b consulFilter }
	filterOr  struct{ a, b consulFilter }
	filterNot struct{ a consulFilter }
	filterCmp struct {
		sel, op, value string
	}
)

func (f filterAnd) match(e *consulEntry) bool { return f.a.match(e) && f.b.match(e) }
func (f filterOr) match(e *consulEntry) bool  { return f.a.match(e) || f.b.match(e) }
func (f filterNot) match(e *consulEntry) bool { return !f.a.match(e) }

// field returns a selector's value: a string, or for Tags and Meta a list
// (of tags, of keys).
func (f filterCmp) field(e *consulEntry) (string, []string) {
	switch f.sel {
	case "Service.ID":
		return e.Service.ID, nil
	case "Service.Service":
		return e.Service.Service, nil
	case "Service.Address":
		return e.Service.Address, nil
	case "Service.Port":
		return strconv.Itoa(e.Service.Port), nil
	case "Service.Tags":
		return "", e.Service.Tags
	case "Service.Meta":
		return "", sortedKeys(e.Service.Meta)
	case "Node.Node":
		return e.Node.Node, nil
	case "Node.Address":
		return e.Node.Address, nil
	case "Node.Datacenter":
		return e.Node.Datacenter, nil
	case "Node.Meta":
		return "", sortedKeys(e.Node.Meta)
	}
	if k, ok := strings.CutPrefix(f.sel, "Service.Meta."); ok {
		return e.Service.Meta[k], nil
	}
	k, _ := strings.CutPrefix(f.sel, "Node.Meta.")
	return e.Node.Meta[k], nil
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func (f filterCmp) match(e *consulEntry) bool {
	s, list := f.field(e)
	switch f.op {
	case "==":
		return s == f.value
	case "!=":
		return s != f.value
	case "contains", "in":
		return slices.Contains(list, f.value)
	case "not contains", "not in":
		return !slices.Contains(list, f.value)
	case "is empty":
		return s == "" && len(list) == 0
	}
	return s != "" || len(list) > 0 // is not empty
}

func isList(sel string) bool {
	return sel == "Service.Tags" || sel == "Service.Meta" || sel == "Node.Meta"
}

func validSelector(sel string) bool {
	switch sel {
	case "Service.ID", "Service.Service", "Service.Address", "Service.Port", "Service.Tags", "Service.Meta",
		"Node.Node", "Node.Address", "Node.Datacenter", "Node.Meta":
		return true
	}
	for _, p := range []string{"Service.Meta.", "Node.Meta."} {
		if k, ok := strings.CutPrefix(sel, p); ok && k != "" {
			return true
		}
	}
	return false
}

// parseConsulFilter parses a filter; "" is no filter (nil).
func parseConsulFilter(text string) (consulFilter, error) {
	if strings.TrimSpace(text) == "" {
		return nil, nil
	}
	if len(text) > maxFilterLen {
		return nil, fmt.Errorf("filter: %d bytes, at most %d", len(text), maxFilterLen)
	}
	toks, err := filterTokens(text)
	if err != nil {
		return nil, err
	}
	p := &filterParser{toks: toks}
	f, err := p.or(0)
	if err == nil && p.pos < len(p.toks) {
		err = fmt.Errorf("unexpected %q", p.toks[p.pos].text)
	}
	if err != nil {
		return nil, fmt.Errorf("filter: %v (served: ==, !=, contains, in, is empty, and, or, not, parentheses over Service.ID|Service|Address|Port|Tags|Meta.KEY and Node.Node|Address|Datacenter|Meta.KEY)", err)
	}
	return f, nil
}

type filterToken struct {
	text   string
	quoted bool
}

func filterTokens(s string) ([]filterToken, error) {
	var out []filterToken
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n':
			i++
		case c == '(' || c == ')':
			out = append(out, filterToken{text: string(c)})
			i++
		case c == '=' || c == '!':
			if i+1 >= len(s) || s[i+1] != '=' {
				return nil, fmt.Errorf("at byte %d: expected == or !=", i)
			}
			out = append(out, filterToken{text: s[i : i+2]})
			i += 2
		case c == '"' || c == '`':
			j := i + 1
			var b strings.Builder
			for ; j < len(s) && s[j] != c; j++ {
				if s[j] == '\\' && c == '"' && j+1 < len(s) {
					j++
				}
				b.WriteByte(s[j])
			}
			if j >= len(s) {
				return nil, fmt.Errorf("at byte %d: unterminated string", i)
			}
			out = append(out, filterToken{text: b.String(), quoted: true})
			i = j + 1
		default:
			j := i
			for j < len(s) && !strings.ContainsRune(" \t\n()=!\"`", rune(s[j])) {
				j++
			}
			out = append(out, filterToken{text: s[i:j]})
			i = j
		}
	}
	return out, nil
}

type filterParser struct {
	toks []filterToken
	pos  int
}

func (p *filterParser) peek(words ...string) bool {
	for n, w := range words {
		if p.pos+n >= len(p.toks) || p.toks[p.pos+n].quoted || p.toks[p.pos+n].text != w {
			return false
		}
	}
	return true
}

func (p *filterParser) next() (filterToken, error) {
	if p.pos >= len(p.toks) {
		return filterToken{}, fmt.Errorf("unexpected end")
	}
	t := p.toks[p.pos]
	p.pos++
	return t, nil
}

func (p *filterParser) or(depth int) (consulFilter, error) {
	if depth > maxFilterDepth {
		return nil, fmt.Errorf("nested deeper than %d", maxFilterDepth)
	}
	a, err := p.and(depth)
	for err == nil && p.peek("or") {
		p.pos++
		var b consulFilter
		if b, err = p.and(depth); err == nil {
			a = filterOr{a, b}
		}
	}
	return a, err
}

func (p *filterParser) and(depth int) (consulFilter, error) {
	a, err := p.unary(depth)
	for err == nil && p.peek("and") {
		p.pos++
		var b consulFilter
		if b, err = p.unary(depth); err == nil {
			a = filterAnd{a, b}
		}
	}
	return a, err
}

func (p *filterParser) unary(depth int) (consulFilter, error) {
	switch {
	case p.peek("not"):
		p.pos++
		a, err := p.unary(depth + 1)
		return filterNot{a}, err
	case p.peek("("):
		p.pos++
		a, err := p.or(depth + 1)
		if err == nil && !p.peek(")") {
			err = fmt.Errorf("missing )")
		}
		p.pos++
		return a, err
	}
	return p.cmp()
}

func (p *filterParser) cmp() (consulFilter, error) {
	first, err := p.next()
	if err != nil {
		return nil, err
	}
	// value in selector / value not in selector
	for _, op := range [][]string{{"in"}, {"not", "in"}} {
		if p.peek(op...) {
			p.pos += len(op)
			sel, err := p.next()
			if err != nil {
				return nil, err
			}
			if !isList(sel.text) {
				return nil, fmt.Errorf("%q: in takes Service.Tags, Service.Meta or Node.Meta", sel.text)
			}
			return filterCmp{sel: sel.text, op: strings.Join(op, " "), value: first.text}, nil
		}
	}
	sel := first.text
	if first.quoted || !validSelector(sel) {
		return nil, fmt.Errorf("unknown selector %q", sel)
	}
	for _, op := range [][]string{{"is", "empty"}, {"is", "not", "empty"}} {
		if p.peek(op...) {
			p.pos += len(op)
			return filterCmp{sel: sel, op: strings.Join(op, " ")}, nil
		}
	}
	for _, op := range [][]string{{"=="}, {"!="}, {"contains"}, {"not", "contains"}} {
		if p.peek(op...) {
			p.pos += len(op)
			v, err := p.next()
			if err != nil {
				return nil, err
			}
			o := strings.Join(op, " ")
			if (o == "contains" || o == "not contains") != isList(sel) {
				return nil, fmt.Errorf("%s %s: contains takes Service.Tags, Service.Meta or Node.Meta; == and != the others", sel, o)
			}
			return filterCmp{sel: sel, op: o, value: v.text}, nil
		}
	}
	return nil, fmt.Errorf("%q: expected ==, !=, contains, is empty after it", sel)
}
