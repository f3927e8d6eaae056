//! `cargo bench --bench framing`: the `ack = "response"` frame scanners over
//! realistic streams, in bytes per second.
//!
//! Each input is about 1 MiB, fed in 64 KiB chunks (a bulk read) and in
//! 1500-byte chunks (one TCP segment per read), so frames straddle chunk
//! boundaries as they do on a socket:
//!
//! - **lines**: 100-byte lines (the comparison benchmark's load) and
//!   20-byte lines (short commands);
//! - **length-prefixed**: 4-byte big-endian length, 100-byte and 4 KiB
//!   payloads;
//! - **resp**: Redis requests (`SET key:N value` and `GET key:N` arrays of
//!   bulk strings) and Redis replies (`+OK`, bulk strings, integers,
//!   `-ERR`, nil).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use holdfast::config::{Framing, LengthPrefixed};
use holdfast::framing::Scanner;

const TARGET: usize = 1 << 20;
const MAX_FRAME: usize = 1 << 20;
const CHUNKS: [usize; 2] = [64 * 1024, 1500];

fn lines(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(TARGET + len);
    let mut i = 0u64;
    while v.len() < TARGET {
        let mut line = format!("line {i:08} ").into_bytes();
        line.resize(len - 1, b'x');
        line.push(b'\n');
        v.extend_from_slice(&line);
        i += 1;
    }
    v
}

fn length_prefixed(payload: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(TARGET + payload + 4);
    while v.len() < TARGET {
        v.extend_from_slice(&(payload as u32).to_be_bytes());
        v.resize(v.len() + payload, b'p');
    }
    v
}

fn bulk(v: &mut Vec<u8>, s: &[u8]) {
    v.extend_from_slice(format!("${}\r\n", s.len()).as_bytes());
    v.extend_from_slice(s);
    v.extend_from_slice(b"\r\n");
}

fn resp_requests() -> Vec<u8> {
    let mut v = Vec::with_capacity(TARGET + 256);
    let mut i = 0u64;
    let value = vec![b'v'; 64];
    while v.len() < TARGET {
        let key = format!("key:{i:010}");
        if i % 2 == 0 {
            v.extend_from_slice(b"*3\r\n");
            bulk(&mut v, b"SET");
            bulk(&mut v, key.as_bytes());
            bulk(&mut v, &value);
        } else {
            v.extend_from_slice(b"*2\r\n");
            bulk(&mut v, b"GET");
            bulk(&mut v, key.as_bytes());
        }
        i += 1;
    }
    v
}

fn resp_replies() -> Vec<u8> {
    let mut v = Vec::with_capacity(TARGET + 256);
    let mut i = 0u64;
    let value = vec![b'v'; 64];
    while v.len() < TARGET {
        match i % 5 {
            0 => v.extend_from_slice(b"+OK\r\n"),
            1 => bulk(&mut v, &value),
            2 => v.extend_from_slice(format!(":{i}\r\n").as_bytes()),
            3 => v.extend_from_slice(b"$-1\r\n"),
            _ => v.extend_from_slice(b"-ERR wrong number of arguments\r\n"),
        }
        i += 1;
    }
    v
}

fn scan_all(framing: &Framing, input: &[u8], chunk: usize, ends: &mut Vec<u64>) -> usize {
    let mut s = Scanner::new(framing);
    let mut frames = 0;
    for c in input.chunks(chunk) {
        ends.clear();
        s.scan(c, ends).expect("valid input");
        frames += ends.len();
    }
    frames
}

fn scanners(c: &mut Criterion) {
    let lp = |max_frame| {
        Framing::LengthPrefixed(LengthPrefixed {
            length_field_offset: 0,
            length_field_length: 4,
            big_endian: true,
            length_adjustment: 0,
            max_frame,
        })
    };
    let cases: Vec<(&str, Framing, Vec<u8>)> = vec![
        (
            "lines_100B",
            Framing::Lines {
                max_frame: MAX_FRAME,
            },
            lines(100),
        ),
        (
            "lines_20B",
            Framing::Lines {
                max_frame: MAX_FRAME,
            },
            lines(20),
        ),
        ("length_100B", lp(MAX_FRAME), length_prefixed(100)),
        ("length_4KiB", lp(MAX_FRAME), length_prefixed(4096)),
        (
            "resp_requests",
            Framing::Resp {
                max_frame: MAX_FRAME,
            },
            resp_requests(),
        ),
        (
            "resp_replies",
            Framing::Resp {
                max_frame: MAX_FRAME,
            },
            resp_replies(),
        ),
    ];
    for (name, framing, input) in &cases {
        let mut g = c.benchmark_group(format!("scan/{name}"));
        g.throughput(Throughput::Bytes(input.len() as u64));
        let mut ends = Vec::with_capacity(64 * 1024);
        let frames = scan_all(framing, input, 64 * 1024, &mut ends);
        assert!(frames > 100, "{name}: {frames} frames");
        for chunk in CHUNKS {
            g.bench_with_input(BenchmarkId::new("chunk", chunk), input, |b, input| {
                b.iter(|| black_box(scan_all(framing, input, chunk, &mut ends)));
            });
        }
        g.finish();
    }
}

criterion_group!(benches, scanners);
criterion_main!(benches);
