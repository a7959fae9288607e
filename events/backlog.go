package events

import "github.com/twmb/franz-go/pkg/kgo"

// backlog holds the events polled from the client and not yet handled,
// per partition in offset order. The consumer drains the client's buffer
// into it as soon as it runs low, because franz-go fetches from a broker
// again only once what it fetched before was taken: the next fetch is
// then under way while the backlog's rounds are handled, instead of
// after them. It holds at most one fetch per broker (FetchMaxBytes) plus
// less than a round.
type backlog struct {
	parts []*partBacklog // in the order they were first polled
	n     int            // records in all parts
}

type partBacklog struct {
	topic     string
	partition int32
	recs      []*kgo.Record
	hw        int64 // the partition's high watermark at its last fetch
}

// add appends what a poll returned.
func (b *backlog) add(fetches kgo.Fetches) {
	fetches.EachPartition(func(p kgo.FetchTopicPartition) {
		if len(p.Records) == 0 {
			return
		}
		pb := b.part(p.Topic, p.Partition)
		pb.recs = append(pb.recs, p.Records...)
		pb.hw = p.HighWatermark
		b.n += len(p.Records)
	})
}

func (b *backlog) part(topic string, partition int32) *partBacklog {
	for _, pb := range b.parts {
		if pb.topic == topic && pb.partition == partition {
			return pb
		}
	}
	pb := &partBacklog{topic: topic, partition: partition}
	b.parts = append(b.parts, pb)
	return pb
}

// take removes a round of at most n records, shared evenly among the
// partitions that have some (so a round keeps every partition's workers
// busy), each partition's in offset order.
func (b *backlog) take(n int) round {
	var r round
	want := make([]int, len(b.parts))
	for left, open := min(n, b.n), len(b.parts); left > 0 && open > 0; {
		share, spare := left/open, left%open
		open = 0
		for i, pb := range b.parts {
			room := len(pb.recs) - want[i]
			if room == 0 {
				continue
			}
			give := share
			if spare > 0 {
				give, spare = give+1, spare-1
			}
			give = min(give, room)
			want[i] += give
			left -= give
			if room > give {
				open++
			}
		}
	}
	kept := b.parts[:0]
	for i, pb := range b.parts {
		if want[i] > 0 {
			r.parts = append(r.parts, pb.recs[:want[i]:want[i]])
			r.hw = append(r.hw, pb.hw)
			pb.recs = pb.recs[want[i]:]
			b.n -= want[i]
		}
		if len(pb.recs) > 0 {
			kept = append(kept, pb)
		}
	}
	clear(b.parts[len(kept):])
	b.parts = kept
	return r
}

// drop empties the backlog and returns each partition's first record,
// from which the client must fetch again.
func (b *backlog) drop() []*kgo.Record {
	var first []*kgo.Record
	for _, pb := range b.parts {
		first = append(first, pb.recs[0])
	}
	clear(b.parts)
	b.parts, b.n = b.parts[:0], 0
	return first
}
