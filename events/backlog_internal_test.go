package events

import (
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"
)

// fetchOf builds what a poll returns: counts[i] records of partition i of
// topic t, starting at offset from[i].
func fetchOf(t string, from []int64, counts []int) kgo.Fetches {
	ft := kgo.FetchTopic{Topic: t}
	for p, n := range counts {
		fp := kgo.FetchPartition{Partition: int32(p), HighWatermark: from[p] + int64(n)}
		for i := range n {
			fp.Records = append(fp.Records, &kgo.Record{Topic: t, Partition: int32(p), Offset: from[p] + int64(i)})
		}
		ft.Partitions = append(ft.Partitions, fp)
	}
	return kgo.Fetches{{Topics: []kgo.FetchTopic{ft}}}
}

// A round shares its records evenly among the partitions that have some,
// each partition's in offset order and continuing where the last round of
// it stopped; drop names each partition's first record left.
func TestBacklogTakesRoundsEvenlyInOffsetOrder(t *testing.T) {
	var b backlog
	b.add(fetchOf("t", []int64{0, 100, 7}, []int{3, 40, 20}))
	b.add(fetchOf("t", []int64{3, 140, 27}, []int{0, 10, 1})) // a later poll appends
	if b.n != 74 {
		t.Fatalf("backlog holds %d records, want 74", b.n)
	}
	next := map[int32]int64{0: 0, 1: 100, 2: 7}
	take := func(n int, want map[int32]int) {
		t.Helper()
		r := b.take(n)
		got := map[int32]int{}
		for i, recs := range r.parts {
			p := recs[0].Partition
			got[p] = len(recs)
			for _, rec := range recs {
				if rec.Partition != p || rec.Offset != next[p] {
					t.Fatalf("partition %d: record %d/%d, want %d/%d", p, rec.Partition, rec.Offset, p, next[p])
				}
				next[p]++
			}
			if want := map[int32]int64{0: 3, 1: 150, 2: 28}[p]; r.hw[i] != want {
				t.Errorf("partition %d: high watermark %d, want %d", p, r.hw[i], want)
			}
		}
		if len(got) != len(want) {
			t.Fatalf("round %v, want %v", got, want)
		}
		for p, n := range want {
			if got[p] != n {
				t.Fatalf("round %v, want %v", got, want)
			}
		}
	}
	take(30, map[int32]int{0: 3, 1: 14, 2: 13}) // partition 0's 3 leave their share to the others
	take(30, map[int32]int{1: 22, 2: 8})        // partition 2 runs out: partition 1 fills the round
	take(5, map[int32]int{1: 5})
	if first := b.drop(); len(first) != 1 || first[0].Partition != 1 || first[0].Offset != 141 {
		t.Fatalf("drop returned %v, want partition 1's record 141", first)
	}
	if b.n != 0 || len(b.take(10).parts) != 0 {
		t.Fatalf("the backlog is not empty after drop")
	}
}
