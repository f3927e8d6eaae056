//! Measures the only pause host failover puts on a client connection: the
//! accept-time capture of its kernel state (`failover::repair::capture`,
//! TCP_REPAIR on and off). Needs CAP_NET_ADMIN; uses loopback only.
//!
//!   cargo run --release --example failover_pause -- [accepts] [warm captures]
//!
//! Prints min, median, p99 and max over fresh accepts (the real case: one
//! capture per connection, right after accept), then over repeated captures
//! of one established connection.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use holdfast::failover::repair;

fn stats(what: &str, mut v: Vec<Duration>) {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "{what}: n={} min {:?} median {:?} p99 {:?} max {:?}",
        v.len(),
        v[0],
        at(0.5),
        at(0.99),
        v[v.len() - 1]
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let accepts: usize = args.next().map_or(200, |a| a.parse().expect("accepts"));
    let warm: usize = args
        .next()
        .map_or(2000, |a| a.parse().expect("warm captures"));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let clients = std::thread::spawn(move || {
        for _ in 0..accepts {
            let mut c = TcpStream::connect(addr).expect("connect");
            let mut b = [0u8; 1];
            c.read_exact(&mut b).expect("server byte");
        }
    });
    let mut pauses = Vec::with_capacity(accepts);
    for _ in 0..accepts {
        let (mut conn, _) = listener.accept().expect("accept");
        let t = Instant::now();
        repair::capture(conn.as_fd()).expect("capture (needs CAP_NET_ADMIN)");
        pauses.push(t.elapsed());
        conn.write_all(b"x").expect("write after capture");
    }
    clients.join().unwrap();
    stats("capture at accept", pauses);

    let _peer = TcpStream::connect(addr).expect("connect");
    let (conn, _) = listener.accept().expect("accept");
    let mut warm_pauses = Vec::with_capacity(warm);
    for _ in 0..warm {
        let t = Instant::now();
        repair::capture(conn.as_fd()).expect("capture");
        warm_pauses.push(t.elapsed());
    }
    stats("repeated capture, one connection", warm_pauses);
}
