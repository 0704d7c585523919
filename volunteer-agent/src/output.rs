//! Capped capture of a job's output.
//!
//! A job can print without limit, but a donor lends the farm a bounded amount
//! of memory and bandwidth per job. [`OutputCap`] sees every byte a job writes
//! (stdout, stderr and the agent's own system lines, in the order they
//! happen) and keeps at most `cap` of them: the first `cap/2` bytes (the
//! *head*) are handed back at once so they can be streamed live, the last
//! `cap/2` bytes (the *tail*) are kept in a ring buffer and handed out by
//! [`OutputCap::finish`], preceded by one system line saying how much was cut
//! from the middle. The end of a log is usually where the error is, so the
//! tail is worth keeping even though it can only be sent at the end.

use std::collections::VecDeque;

use trunkfarm_proto::v1::LogStream;

/// The largest chunk of log data handed out at once (64 KiB), so that one log
/// message never grows past what the transport comfortably carries.
pub(crate) const MAX_CHUNK: usize = 64 * 1024;

/// Decides which of a job's output bytes are kept: a live-streamed head, a
/// tail kept until the end, and a count of what was cut in between.
#[derive(Debug)]
pub(crate) struct OutputCap {
    /// The configured cap in bytes; 0 means no cap.
    cap: u64,
    /// Head bytes still allowed before output starts going to the tail.
    head_room: u64,
    /// Most bytes the tail keeps (`cap / 2`).
    tail_limit: usize,
    /// The tail, oldest first; consecutive bytes of one stream are merged
    /// into chunks of at most [`MAX_CHUNK`] bytes.
    tail: VecDeque<TailChunk>,
    /// Bytes currently held in `tail`.
    tail_len: usize,
    /// Every byte ever pushed.
    total: u64,
    /// Bytes handed back as head (live).
    head_len: u64,
    /// The last byte of the head, to start the cut notice on a fresh line.
    last_head_byte: Option<u8>,
}

/// One chunk of the tail ring buffer. Eviction trims from the front by moving
/// `start` instead of shifting the bytes.
#[derive(Debug)]
struct TailChunk {
    /// The stream the bytes came from.
    stream: LogStream,
    /// The bytes; only `data[start..]` is still part of the tail.
    data: Vec<u8>,
    /// Offset of the first byte still kept.
    start: usize,
}

impl TailChunk {
    /// Bytes of this chunk still kept.
    fn len(&self) -> usize {
        self.data.len() - self.start
    }
}

/// What [`OutputCap::finish`] leaves to send after the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CapEnd {
    /// The cut notice (a system line, only when something was cut) followed
    /// by the tail, in the order the bytes were written; each chunk is at
    /// most [`MAX_CHUNK`] bytes.
    pub chunks: Vec<(LogStream, Vec<u8>)>,
    /// Bytes dropped from the middle of the output.
    pub bytes_cut: u64,
}

impl OutputCap {
    /// A capture keeping at most `cap` bytes (`cap / 2` head, `cap / 2`
    /// tail); `cap == 0` keeps everything and streams it all live.
    pub(crate) fn new(cap: u64) -> Self {
        let half = cap / 2;
        OutputCap {
            cap,
            head_room: if cap == 0 { u64::MAX } else { half },
            tail_limit: usize::try_from(half).unwrap_or(usize::MAX),
            tail: VecDeque::new(),
            tail_len: 0,
            total: 0,
            head_len: 0,
            last_head_byte: None,
        }
    }

    /// Takes the next bytes the job wrote on `stream` and returns the prefix
    /// of `data` that belongs to the head and should be streamed now (empty
    /// once the head is full). The rest goes to the tail.
    pub(crate) fn push<'a>(&mut self, stream: LogStream, data: &'a [u8]) -> &'a [u8] {
        let len = data.len() as u64;
        self.total = self.total.saturating_add(len);
        let take = usize::try_from(self.head_room.min(len)).unwrap_or(data.len());
        let (live, rest) = data.split_at(take);
        self.head_room -= take as u64;
        self.head_len += take as u64;
        if let Some(&last) = live.last() {
            self.last_head_byte = Some(last);
        }
        if !rest.is_empty() {
            self.push_tail(stream, rest);
        }
        live
    }

    /// Appends `data` to the tail and evicts the oldest bytes beyond the
    /// tail limit.
    fn push_tail(&mut self, stream: LogStream, data: &[u8]) {
        if self.tail_limit == 0 {
            return;
        }
        // Bytes that would be evicted at once are never copied.
        let data = &data[data.len().saturating_sub(self.tail_limit)..];
        self.tail_len += data.len();
        let mut rest = data;
        while !rest.is_empty() {
            let room = match self.tail.back_mut() {
                Some(last) if last.stream == stream && last.start == 0 => {
                    MAX_CHUNK.saturating_sub(last.data.len())
                }
                _ => 0,
            };
            if room > 0
                && let Some(last) = self.tail.back_mut()
            {
                let n = room.min(rest.len());
                last.data.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            } else {
                let n = MAX_CHUNK.min(rest.len());
                self.tail.push_back(TailChunk {
                    stream,
                    data: rest[..n].to_vec(),
                    start: 0,
                });
                rest = &rest[n..];
            }
        }
        while self.tail_len > self.tail_limit {
            let excess = self.tail_len - self.tail_limit;
            let Some(front) = self.tail.front_mut() else {
                break;
            };
            let front_len = front.len();
            if front_len <= excess {
                self.tail.pop_front();
                self.tail_len -= front_len;
            } else {
                front.start += excess;
                self.tail_len -= excess;
            }
        }
    }

    /// Bytes cut from the middle so far (written, but neither head nor tail).
    pub(crate) fn bytes_cut(&self) -> u64 {
        self.total - self.head_len - self.tail_len as u64
    }

    /// Ends the capture: the cut notice (if anything was cut) and the tail.
    pub(crate) fn finish(self) -> CapEnd {
        let bytes_cut = self.bytes_cut();
        let mut chunks = Vec::with_capacity(self.tail.len() + 1);
        if bytes_cut > 0 {
            let newline = match self.last_head_byte {
                Some(b'\n') | None => "",
                Some(_) => "\n",
            };
            let notice = format!(
                "{newline}[trunkfarm: {bytes_cut} {} of output cut here to stay under the {} cap]\n",
                if bytes_cut == 1 { "byte" } else { "bytes" },
                human_size(self.cap),
            );
            chunks.push((LogStream::System, notice.into_bytes()));
        }
        for mut chunk in self.tail {
            if chunk.start > 0 {
                chunk.data.drain(..chunk.start);
            }
            chunks.push((chunk.stream, chunk.data));
        }
        CapEnd { chunks, bytes_cut }
    }
}

/// Formats a byte count the way the cut notice shows the cap: `"512 B"`,
/// `"4.0 MiB"`, `"1.5 GiB"`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    use LogStream::{Stderr, Stdout, System};

    /// Feeds `pushes` through a cap and returns (live bytes, end).
    fn run(cap: u64, pushes: &[(LogStream, &[u8])]) -> (Vec<(LogStream, Vec<u8>)>, CapEnd) {
        let mut oc = OutputCap::new(cap);
        let mut live = Vec::new();
        for (stream, data) in pushes {
            let head = oc.push(*stream, data);
            if !head.is_empty() {
                live.push((*stream, head.to_vec()));
            }
        }
        (live, oc.finish())
    }

    /// All bytes of the chunks, concatenated.
    fn concat(chunks: &[(LogStream, Vec<u8>)]) -> Vec<u8> {
        chunks.iter().flat_map(|(_, d)| d.iter().copied()).collect()
    }

    /// The chunks without the cut notice.
    fn tail_only(end: &CapEnd) -> Vec<(LogStream, Vec<u8>)> {
        let skip = usize::from(end.bytes_cut > 0);
        end.chunks[skip..].to_vec()
    }

    #[test]
    fn zero_cap_streams_everything_live() {
        let big = vec![b'x'; 3 * MAX_CHUNK];
        let (live, end) = run(0, &[(Stdout, b"hello "), (Stderr, &big), (System, b"bye")]);
        assert_eq!(live.len(), 3);
        assert_eq!(live[1].1.len(), big.len());
        assert_eq!(end.bytes_cut, 0);
        assert!(end.chunks.is_empty());
    }

    #[test]
    fn under_the_cap_nothing_is_cut() {
        let (live, end) = run(10, &[(Stdout, b"abc")]);
        assert_eq!(live, vec![(Stdout, b"abc".to_vec())]);
        assert_eq!(
            end,
            CapEnd {
                chunks: vec![],
                bytes_cut: 0
            }
        );
    }

    #[test]
    fn exactly_the_cap_nothing_is_cut() {
        let (live, end) = run(10, &[(Stdout, b"0123456789")]);
        assert_eq!(live, vec![(Stdout, b"01234".to_vec())]);
        assert_eq!(end.bytes_cut, 0);
        assert_eq!(end.chunks, vec![(Stdout, b"56789".to_vec())]);
    }

    #[test]
    fn one_byte_over_the_cap_cuts_one_byte() {
        let (live, end) = run(10, &[(Stdout, b"0123456789A")]);
        assert_eq!(concat(&live), b"01234");
        assert_eq!(end.bytes_cut, 1);
        assert_eq!(
            end.chunks[0],
            (
                System,
                b"\n[trunkfarm: 1 byte of output cut here to stay under the 10 B cap]\n".to_vec()
            )
        );
        assert_eq!(tail_only(&end), vec![(Stdout, b"6789A".to_vec())]);
    }

    #[test]
    fn head_boundary_inside_a_chunk() {
        let (live, end) = run(8, &[(Stdout, b"ab"), (Stdout, b"cdef"), (Stdout, b"gh")]);
        assert_eq!(
            live,
            vec![(Stdout, b"ab".to_vec()), (Stdout, b"cd".to_vec())]
        );
        assert_eq!(end.bytes_cut, 0);
        assert_eq!(end.chunks, vec![(Stdout, b"efgh".to_vec())]);
    }

    #[test]
    fn head_boundary_exactly_at_a_chunk_end() {
        let (live, end) = run(8, &[(Stdout, b"abcd"), (Stdout, b"efgh"), (Stdout, b"ij")]);
        assert_eq!(live, vec![(Stdout, b"abcd".to_vec())]);
        assert_eq!(end.bytes_cut, 2);
        assert_eq!(tail_only(&end), vec![(Stdout, b"ghij".to_vec())]);
    }

    #[test]
    fn multi_chunk_tail_keeps_only_the_last_bytes() {
        let pushes: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 7]).collect();
        let mut oc = OutputCap::new(40);
        let mut live = Vec::new();
        for p in &pushes {
            live.extend_from_slice(oc.push(Stdout, p));
        }
        assert_eq!(oc.bytes_cut(), 700 - 40);
        let all: Vec<u8> = pushes.concat();
        let end = oc.finish();
        assert_eq!(live, all[..20]);
        assert_eq!(end.bytes_cut, 660);
        assert_eq!(concat(&tail_only(&end)), all[680..]);
    }

    #[test]
    fn a_single_push_bigger_than_the_cap() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let (live, end) = run(100, &[(Stderr, &data)]);
        assert_eq!(concat(&live), data[..50]);
        assert_eq!(end.bytes_cut, 900);
        assert_eq!(tail_only(&end), vec![(Stderr, data[950..].to_vec())]);
    }

    #[test]
    fn interleaved_streams_keep_their_order() {
        let pushes: &[(LogStream, &[u8])] = &[
            (Stdout, b"o1"),
            (Stderr, b"e1"),
            (System, b"s1"),
            (Stdout, b"o2"),
            (Stdout, b"o3"),
            (Stderr, b"e2"),
            (Stdout, b"o4"),
            (Stderr, b"e3"),
        ];
        // 16 bytes in, cap 10: head "o1e1s", cut "1o2o3e", tail "2o4e3"
        let (live, end) = run(10, pushes);
        assert_eq!(
            live,
            vec![
                (Stdout, b"o1".to_vec()),
                (Stderr, b"e1".to_vec()),
                (System, b"s".to_vec())
            ]
        );
        assert_eq!(end.bytes_cut, 6);
        assert_eq!(
            tail_only(&end),
            vec![
                (Stderr, b"2".to_vec()),
                (Stdout, b"o4".to_vec()),
                (Stderr, b"e3".to_vec())
            ]
        );
    }

    #[test]
    fn odd_cap_keeps_half_rounded_down_each_side() {
        let (live, end) = run(5, &[(Stdout, b"abcdefg")]);
        assert_eq!(concat(&live), b"ab");
        assert_eq!(end.bytes_cut, 3);
        assert_eq!(concat(&tail_only(&end)), b"fg");
    }

    #[test]
    fn cap_of_one_keeps_nothing() {
        let (live, end) = run(1, &[(Stdout, b"abc")]);
        assert!(live.is_empty());
        assert_eq!(end.bytes_cut, 3);
        assert_eq!(end.chunks.len(), 1, "only the notice");
        assert_eq!(end.chunks[0].0, System);
        // Nothing was streamed, so the notice needs no leading newline.
        assert!(end.chunks[0].1.starts_with(b"[trunkfarm: 3 bytes"));
    }

    #[test]
    fn notice_wording_and_newline_handling() {
        let mut oc = OutputCap::new(4 * 1024 * 1024);
        let line = vec![b'y'; 1023];
        let mut total = 0u64;
        while total < 5 * 1024 * 1024 {
            oc.push(Stdout, &line);
            oc.push(Stdout, b"\n");
            total += 1024;
        }
        let end = oc.finish();
        assert_eq!(end.bytes_cut, total - 4 * 1024 * 1024);
        let notice = String::from_utf8(end.chunks[0].1.clone()).unwrap();
        assert_eq!(
            notice,
            format!(
                "[trunkfarm: {} bytes of output cut here to stay under the 4.0 MiB cap]\n",
                end.bytes_cut
            )
        );
    }

    #[test]
    fn tail_chunks_never_exceed_max_chunk() {
        let cap = 6 * MAX_CHUNK as u64;
        let mut oc = OutputCap::new(cap);
        let mut fed = Vec::new();
        for i in 0..200u32 {
            let piece = vec![(i % 251) as u8; 10_000 + (i as usize % 7) * 1000];
            oc.push(if i % 3 == 0 { Stderr } else { Stdout }, &piece);
            fed.extend_from_slice(&piece);
        }
        let end = oc.finish();
        let tail = tail_only(&end);
        assert!(
            tail.iter()
                .all(|(_, d)| !d.is_empty() && d.len() <= MAX_CHUNK)
        );
        let kept = concat(&tail);
        assert_eq!(kept.len() as u64, cap / 2);
        assert_eq!(kept, fed[fed.len() - kept.len()..]);
        assert_eq!(end.bytes_cut, fed.len() as u64 - cap);
    }

    #[test]
    fn bytes_cut_tracks_progress() {
        let mut oc = OutputCap::new(4);
        oc.push(Stdout, b"ab");
        assert_eq!(oc.bytes_cut(), 0);
        oc.push(Stdout, b"cd");
        assert_eq!(oc.bytes_cut(), 0);
        oc.push(Stdout, b"e");
        assert_eq!(oc.bytes_cut(), 1);
        oc.push(Stdout, b"");
        assert_eq!(oc.bytes_cut(), 1);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1.0 KiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(4 * 1024 * 1024), "4.0 MiB");
        assert_eq!(human_size(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
