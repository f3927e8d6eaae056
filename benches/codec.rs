//! `cargo bench --bench codec`: the resume protocol's (HFRP/1) frame codec
//! and one leg's send path, from `src/proto`.
//!
//! - **decode**: a read buffer holding 1 MiB of DATA frames (128 B or 64 KiB
//!   payloads) with an ACK after every 64 KiB, decoded frame by frame as the
//!   session driver does (payloads split off without copying); bytes/s.
//! - **encode**: ACK and DATA frames with `proto::encode`, and the DATA
//!   header alone (`data_header`, what the hot path writes); frames/s.
//! - **link**: [`Link::fill`] taking 1 MiB of 128 B or 64 KiB chunks from a
//!   stream into wire frames, `wire` gathering them for a vectored write,
//!   `on_written`, and the peer's ACK applied with `on_frame`; bytes/s.
//! - **handshake**: HELLO and WELCOME encode (HMAC-SHA256 token) and
//!   decode + verify; once per leg, shown for scale.

use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use holdfast::proto::{
    data_header, encode, ClientAddr, Decoder, Frame, Hello, Link, LinkConfig, Welcome, TOKEN_LEN,
};
use holdfast::stream::Stream;

const TOTAL: usize = 1 << 20;
const SIZES: [usize; 2] = [128, 64 * 1024];
const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn wire_bytes(size: usize) -> BytesMut {
    let payload = Bytes::from(vec![b'd'; size]);
    let mut out = BytesMut::with_capacity(TOTAL + TOTAL / size * 5 + 1024);
    let mut since_ack = 0;
    let mut offset = 0u64;
    for _ in 0..TOTAL / size {
        encode(&Frame::Data(payload.clone()), &mut out);
        since_ack += size;
        offset += size as u64;
        if since_ack >= 64 * 1024 {
            encode(&Frame::Ack(offset), &mut out);
            since_ack = 0;
        }
    }
    out
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    for size in SIZES {
        let wire = wire_bytes(size);
        let decoder = Decoder::new(64 * 1024);
        g.bench_with_input(BenchmarkId::new("data_ack", size), &wire, |b, wire| {
            b.iter_batched(
                || wire.clone(),
                |mut buf| {
                    let mut n = 0;
                    while let Some(f) = decoder.decode(&mut buf).expect("valid frames") {
                        n += 1;
                        black_box(f);
                    }
                    n
                },
                criterion::BatchSize::LargeInput,
            );
        });
    }
    g.finish();
}

fn encode_frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    let mut out = BytesMut::with_capacity(1 << 20);
    g.bench_function("ack", |b| {
        b.iter(|| {
            if out.len() > (1 << 19) {
                out.clear();
            }
            encode(&Frame::Ack(black_box(123_456_789)), &mut out);
        });
    });
    let small = Bytes::from(vec![b'd'; 128]);
    g.bench_function("data_128B_copied", |b| {
        b.iter(|| {
            if out.len() > (1 << 19) {
                out.clear();
            }
            encode(&Frame::Data(small.clone()), &mut out);
        });
    });
    g.bench_function("data_header", |b| {
        b.iter(|| data_header(black_box(65536)));
    });
    g.finish();
}

fn link(c: &mut Criterion) {
    let mut g = c.benchmark_group("link");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    for size in SIZES {
        let chunk = Bytes::from(vec![b'd'; size]);
        g.bench_function(BenchmarkId::new("fill_write_ack", size), |b| {
            let now = Instant::now();
            let mut link = Link::new(LinkConfig::default(), 64 * 1024, 4 << 20, 0, now);
            let mut s = Stream::new();
            let mut iov = Vec::with_capacity(64);
            b.iter(|| {
                let mut pushed = 0;
                while pushed < TOTAL {
                    // Read up to 64 KiB of chunks, frame them, write them.
                    for _ in 0..(64 * 1024 / size).max(1) {
                        s.push(chunk.clone());
                        pushed += size;
                    }
                    link.fill(&mut s, false, 0, now);
                    loop {
                        iov.clear();
                        link.wire(64, &mut iov);
                        if iov.is_empty() {
                            break;
                        }
                        let n: usize = iov.iter().map(|b| b.len()).sum();
                        link.on_written(n, now);
                    }
                    // The peer acknowledges what it got.
                    let sent = s.sent();
                    link.on_frame(Frame::Ack(sent), &mut s, now)
                        .expect("valid ack");
                }
            });
        });
    }
    g.finish();
}

fn handshake(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake");
    let hello = Hello {
        version_min: 1,
        version_max: 1,
        resume: false,
        session_id: [7; 16],
        epoch: 0,
        recv_offset: 0,
        max_frame: 64 * 1024,
        window: 4 << 20,
        heartbeat_ms: 1000,
        client: ClientAddr::Ip("127.0.0.1".parse().expect("ip"), 40000),
        token: [0; TOKEN_LEN],
    };
    let welcome = Welcome {
        version: 1,
        resumed: false,
        restored: false,
        session_id: [7; 16],
        recv_offset: 0,
        max_frame: 64 * 1024,
        window: 4 << 20,
        heartbeat_ms: 1000,
        token: [0; TOKEN_LEN],
    };
    let mut h = hello.clone();
    let hello_wire = h.encode(KEY);
    let hello_token = h.token;
    g.bench_function("hello_encode", |b| {
        b.iter(|| black_box(hello.clone()).encode(KEY));
    });
    let decoder = Decoder::new(64 * 1024);
    g.bench_function("hello_decode_check", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&hello_wire[..]);
            let Some(Frame::Hello(h)) = decoder.decode(&mut buf).expect("valid") else {
                panic!("not a HELLO")
            };
            h.check(KEY).expect("valid token")
        });
    });
    g.bench_function("welcome_encode", |b| {
        b.iter(|| black_box(welcome.clone()).encode(KEY, &hello_token));
    });
    g.finish();
}

criterion_group!(benches, decode, encode_frames, link, handshake);
criterion_main!(benches);
