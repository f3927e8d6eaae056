//! `cargo bench --bench replay`: the replay buffer and the stream offsets on
//! their steady-state path, in bytes per second.
//!
//! Each iteration moves 1 MiB through one [`Stream`] the way the session
//! driver does: push the chunks read from a source, gather up to 64 of them
//! from `sent` as the slices of a vectored write (`io_slices_from`; the
//! `_cloned` variant gathers `Bytes` clones with `chunks_from`), mark them
//! sent, and acknowledge them (all at once, as `ack = "none"` and client
//! writes do, or in a later batch, as `ack = "tcp"` samples do). Chunk sizes:
//! 128 B (requests and responses) and 64 KiB (bulk reads). It measures the
//! pure core only: no sockets, no tokio.

use std::hint::black_box;
use std::io::IoSlice;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use holdfast::stream::{ReplayBuffer, Stream};

/// Bytes moved per iteration.
const TOTAL: usize = 1 << 20;
/// Chunks per vectored write, as in the driver.
const MAX_IOV: usize = 64;
const SIZES: [usize; 2] = [128, 64 * 1024];

fn chunks(size: usize) -> Vec<Bytes> {
    let one = Bytes::from(vec![b'x'; size]);
    (0..TOTAL / size).map(|_| one.clone()).collect()
}

/// Gathers the unsent chunks as write slices borrowing the buffer (what
/// the driver does) and returns how many bytes they cover (what a vectored
/// write that took everything would return).
fn write_slices(s: &Stream, _iov: &mut Vec<Bytes>) -> usize {
    let mut slices = [IoSlice::new(&[]); MAX_IOV];
    let n = s.buffer().io_slices_from(s.sent(), &mut slices);
    black_box(&slices);
    slices[..n].iter().map(|b| b.len()).sum()
}

/// The same through `chunks_from`: a `Bytes` clone per chunk into a `Vec`
/// (the driver's write path before `io_slices_from`), for comparison.
fn write_slices_cloned(s: &Stream, iov: &mut Vec<Bytes>) -> usize {
    iov.clear();
    s.buffer().chunks_from(s.sent(), MAX_IOV, iov);
    let mut slices = [IoSlice::new(&[]); MAX_IOV];
    for (sl, b) in slices.iter_mut().zip(iov.iter()) {
        *sl = IoSlice::new(b);
    }
    black_box(&slices);
    iov.iter().map(|b| b.len()).sum()
}

fn stream(c: &mut Criterion) {
    let mut g = c.benchmark_group("stream");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    for size in SIZES {
        let input = chunks(size);
        // Read one chunk, write it, ack it at once (`ack = "none"`, client
        // writes): with borrowed slices, and with cloned chunks.
        type Gather = fn(&Stream, &mut Vec<Bytes>) -> usize;
        let ways: [(&str, Gather); 2] = [
            ("push_write_ack", write_slices),
            ("push_write_ack_cloned", write_slices_cloned),
        ];
        for (name, gather) in ways {
            g.bench_with_input(BenchmarkId::new(name, size), &input, |b, input| {
                let mut iov = Vec::with_capacity(MAX_IOV);
                let mut s = Stream::new();
                b.iter(|| {
                    for chunk in input {
                        s.push(chunk.clone());
                        let n = gather(&s, &mut iov);
                        s.on_sent(n as u64);
                        s.ack_to(s.sent());
                    }
                });
            });
        }
        // Read a batch of up to 64 chunks, write them with one vectored
        // write, ack them in a later batch (`ack = "tcp"` sampling).
        g.bench_with_input(
            BenchmarkId::new("batch_write_later_ack", size),
            &input,
            |b, input| {
                let mut iov = Vec::with_capacity(MAX_IOV);
                let mut s = Stream::new();
                b.iter(|| {
                    for batch in input.chunks(MAX_IOV) {
                        let before = s.sent();
                        for chunk in batch {
                            s.push(chunk.clone());
                        }
                        let n = write_slices(&s, &mut iov);
                        s.on_sent(n as u64);
                        s.ack_to(before);
                    }
                    s.ack_to(s.sent());
                });
            },
        );
    }
    g.finish();
}

fn replay_buffer(c: &mut Criterion) {
    let mut g = c.benchmark_group("replay_buffer");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    for size in SIZES {
        let input = chunks(size);
        g.bench_with_input(
            BenchmarkId::new("push_release", size),
            &input,
            |b, input| {
                let mut r = ReplayBuffer::new(0);
                b.iter(|| {
                    for chunk in input {
                        r.push(chunk.clone());
                        r.release_to(r.end());
                    }
                });
            },
        );
        // A full buffer (1 MiB held), then every chunk from a mid offset:
        // what a resume replays.
        g.bench_with_input(
            BenchmarkId::new("chunks_from_full", size),
            &input,
            |b, input| {
                let mut r = ReplayBuffer::new(0);
                for chunk in input {
                    r.push(chunk.clone());
                }
                let mut out = Vec::with_capacity(input.len());
                b.iter(|| {
                    let mut at = r.start() + 1;
                    while at < r.end() {
                        out.clear();
                        r.chunks_from(at, MAX_IOV, &mut out);
                        at += out.iter().map(|b| b.len() as u64).sum::<u64>();
                    }
                    black_box(&out);
                });
            },
        );
        // Pop whole chunks and a split one (response matching).
        g.bench_with_input(BenchmarkId::new("push_pop_to", size), &input, |b, input| {
            let mut r = ReplayBuffer::new(0);
            let mut out = Vec::with_capacity(MAX_IOV + 1);
            b.iter(|| {
                for batch in input.chunks(MAX_IOV) {
                    for chunk in batch {
                        r.push(chunk.clone());
                    }
                    out.clear();
                    r.pop_to(r.end() - 1, &mut out);
                    black_box(&out);
                }
                r.release_to(r.end());
            });
        });
    }
    g.finish();
}

criterion_group!(benches, stream, replay_buffer);
criterion_main!(benches);
