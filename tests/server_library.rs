//! `holdfast::server` over real sockets, driven by a test-side initiator
//! built directly on `holdfast::proto` (HELLO → WELCOME → `Link`): new
//! sessions and half-close, transport breaks and resumes under load, every
//! handshake refusal, manual acks, the ledger example killed and
//! restarted in-process, and all of it over (mutual) TLS: sessions resumed
//! over new TLS connections, certificate rotation, and refused handshakes;
//! and a live session handed from one listener to another on the same
//! socket (a hand-over), transport and all.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use holdfast::proto::{
    ClientAddr, Decoder, ErrorCode, Frame, Hello, Incoming, Link, LinkConfig, TOKEN_LEN,
};
use holdfast::server::{
    AckPolicy, Rejection, ResumableSession, ResumeListener, ServerConfig, TlsConfig,
};
use holdfast::stream::Stream;
use holdfast::transport::Conn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

#[allow(dead_code)]
#[path = "../examples/ledger.rs"]
mod ledger;

#[path = "common/pki.rs"]
mod pki;

const KEY: [u8; 32] = [42u8; 32];
const LIMIT: Duration = Duration::from_secs(20);

fn link_cfg() -> LinkConfig {
    LinkConfig {
        max_frame: 16 * 1024,
        window: 64 * 1024,
        heartbeat: Duration::from_millis(200),
        dead_peer_timeout: Duration::from_secs(5),
        ack_delay: Duration::from_millis(2),
    }
}

fn server_cfg(ack: AckPolicy) -> ServerConfig {
    let mut c = ServerConfig::new(KEY.to_vec());
    c.link = link_cfg();
    c.ack = ack;
    c.handshake_timeout = Duration::from_millis(500);
    c.resume_timeout = Duration::from_secs(10);
    c
}

async fn dial(addr: &str) -> Conn {
    match addr.strip_prefix("unix:") {
        Some(p) => Conn::Unix(UnixStream::connect(p).await.unwrap()),
        None => Conn::Tcp(TcpStream::connect(addr).await.unwrap()),
    }
}

/// Dials, then runs a TLS handshake (as `server.test`) when `tls` is given.
async fn dial_tls(addr: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> std::io::Result<Conn> {
    let conn = dial(addr).await;
    match tls {
        None => Ok(conn),
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from("server.test").unwrap();
            holdfast::transport::tls::connect(config.clone(), name, conn, LIMIT).await
        }
    }
}

fn hello(id: [u8; 16], resume: bool, epoch: u64, recv_offset: u64) -> Hello {
    Hello {
        version_min: 1,
        version_max: 1,
        resume,
        session_id: id,
        epoch,
        recv_offset,
        max_frame: 16 * 1024,
        window: 64 * 1024,
        heartbeat_ms: 0,
        client: ClientAddr::Ip("192.0.2.10".parse().unwrap(), 40000),
        token: [0; TOKEN_LEN],
    }
}

/// Reads one frame (bounded in time); `None` on EOF.
async fn read_frame(conn: &mut Conn, buf: &mut BytesMut) -> Option<Frame> {
    let dec = Decoder::new(1 << 20);
    tokio::time::timeout(LIMIT, async {
        loop {
            if let Some(f) = dec.decode(buf).unwrap() {
                return Some(f);
            }
            if conn.read_buf(buf).await.unwrap_or(0) == 0 {
                return None;
            }
        }
    })
    .await
    .expect("a frame or EOF in time")
}

/// Sends raw handshake bytes; returns the REFUSE code, or `None` when the
/// acceptor closed without one. Checks that the acceptor then closes.
async fn refused(addr: &str, bytes: &[u8]) -> Option<ErrorCode> {
    let mut c = dial(addr).await;
    c.write_all(bytes).await.unwrap();
    let mut buf = BytesMut::new();
    match read_frame(&mut c, &mut buf).await {
        None => None,
        Some(Frame::Refuse { code, .. }) => {
            assert!(
                read_frame(&mut c, &mut buf).await.is_none(),
                "closed after REFUSE"
            );
            Some(code)
        }
        Some(f) => panic!("expected REFUSE, got {f:?}"),
    }
}

struct Leg {
    conn: Conn,
    link: Link,
    rbuf: BytesMut,
}

/// A test initiator: the up stream, everything received down, one leg.
struct Client {
    addr: String,
    id: [u8; 16],
    epoch: u64,
    up: Stream,
    up_fin: bool,
    down: Vec<u8>,
    down_fin: bool,
    leg: Option<Leg>,
    last_hello: Bytes,
    welcome_offset: u64,
    restored: bool,
    /// Dial over TLS with this config.
    tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Debug, PartialEq)]
enum Stop {
    Done,
    Closed,
    Aborted(ErrorCode),
}

impl Client {
    fn new(addr: &str) -> Client {
        Client {
            addr: addr.to_owned(),
            id: rand::random(),
            epoch: 0,
            up: Stream::new(),
            up_fin: false,
            down: Vec::new(),
            down_fin: false,
            leg: None,
            last_hello: Bytes::new(),
            welcome_offset: 0,
            restored: false,
            tls: None,
        }
    }

    fn with_tls(addr: &str, tls: Arc<rustls::ClientConfig>) -> Client {
        Client {
            tls: Some(tls),
            ..Client::new(addr)
        }
    }

    /// Opens a leg: a new session the first time, then resumes with a
    /// greater epoch.
    async fn connect(&mut self) -> Result<(), ErrorCode> {
        let resume = !self.last_hello.is_empty();
        if resume {
            self.epoch += 1;
        }
        let mut h = hello(self.id, resume, self.epoch, self.down.len() as u64);
        let bytes = h.encode(&KEY);
        self.last_hello = bytes.clone();
        let mut conn = dial_tls(&self.addr, self.tls.as_ref())
            .await
            .expect("tls handshake");
        conn.write_all(&bytes).await.unwrap();
        conn.flush().await.unwrap();
        let mut rbuf = BytesMut::new();
        let w = match read_frame(&mut conn, &mut rbuf).await {
            Some(Frame::Welcome(w)) => w,
            Some(Frame::Refuse { code, .. }) => return Err(code),
            other => panic!("expected WELCOME, got {other:?}"),
        };
        w.check(&KEY, &h, self.up.acked(), self.up.sent())
            .expect("a valid WELCOME");
        self.welcome_offset = w.recv_offset;
        self.restored = w.restored;
        self.up.ack_to(w.recv_offset);
        self.up.rewind();
        let link = Link::new(
            LinkConfig {
                dead_peer_timeout: Duration::from_secs(3600),
                ..link_cfg()
            },
            w.max_frame,
            w.window,
            self.down.len() as u64,
            Instant::now(),
        );
        self.leg = Some(Leg { conn, link, rbuf });
        Ok(())
    }

    fn send(&mut self, b: &[u8]) {
        self.up.push(Bytes::copy_from_slice(b));
    }

    fn fin(&mut self) {
        self.up_fin = true;
        self.up.set_fin();
    }

    /// Drives the leg until `until` holds, the leg closes or aborts.
    async fn pump(&mut self, mut until: impl FnMut(&Client) -> bool) -> Stop {
        let deadline = tokio::time::Instant::now() + LIMIT;
        let dec = Decoder::new(1 << 20);
        let mut unflushed = false;
        loop {
            if until(self) {
                return Stop::Done;
            }
            let now = Instant::now();
            let leg = self.leg.as_mut().expect("a leg");
            let consumed = self.down.len() as u64;
            leg.link.fill(&mut self.up, self.up_fin, consumed, now);
            let mut chunks = Vec::new();
            leg.link.wire(64, &mut chunks);
            let ev = {
                let slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
                let (mut rd, mut wr) = tokio::io::split(&mut leg.conn);
                let rbuf = &mut leg.rbuf;
                rbuf.reserve(64 * 1024);
                // A TLS write may leave records in rustls: flush when
                // there is nothing more to write (a no-op on plain TCP).
                let flush = slices.is_empty() && unflushed;
                tokio::select! {
                    r = rd.read_buf(rbuf) => Ok(r),
                    w = async {
                        if slices.is_empty() {
                            wr.flush().await.map(|()| usize::MAX)
                        } else {
                            wr.write_vectored(&slices).await
                        }
                    }, if !slices.is_empty() || flush => Err(w),
                    _ = tokio::time::sleep_until(leg.link.deadline().into()) => Ok(Ok(usize::MAX)),
                    _ = tokio::time::sleep_until(deadline) => panic!("pump timed out"),
                }
            };
            match ev {
                Ok(Ok(usize::MAX)) => {}
                Err(Ok(usize::MAX)) => unflushed = false,
                Ok(Ok(0)) | Ok(Err(_)) | Err(Err(_)) | Err(Ok(0)) => return Stop::Closed,
                Err(Ok(n)) => {
                    leg.link.on_written(n, Instant::now());
                    unflushed = true;
                }
                Ok(Ok(_)) => {
                    while let Some(f) = dec.decode(&mut leg.rbuf).expect("valid frames") {
                        match leg.link.on_frame(f, &mut self.up, Instant::now()) {
                            Ok(Incoming::Data(b)) => self.down.extend_from_slice(&b),
                            Ok(Incoming::Fin(_)) => self.down_fin = true,
                            Ok(Incoming::Abort { code, .. }) => return Stop::Aborted(code),
                            Ok(_) => {}
                            Err(e) => panic!("acceptor broke the protocol: {e}"),
                        }
                    }
                }
            }
        }
    }

    fn complete(&self) -> bool {
        self.leg.as_ref().is_some_and(|l| l.link.complete())
    }

    /// Breaks the transport (drops the socket).
    fn drop_leg(&mut self) {
        self.leg = None;
    }
}

/// The service under test: echoes each read, then after the initiator's FIN
/// writes `bye\n` and shuts down; reports every byte it read.
async fn echo(mut s: ResumableSession, done: mpsc::UnboundedSender<Vec<u8>>) {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        let n = s.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
        s.write_all(&buf[..n]).await.expect("write");
    }
    s.write_all(b"bye\n").await.expect("write after the up FIN");
    s.shutdown().await.unwrap();
    let _ = done.send(all);
}

async fn echo_server() -> (Arc<ResumeListener>, mpsc::UnboundedReceiver<Vec<u8>>) {
    echo_server_with(server_cfg(AckPolicy::Auto)).await
}

async fn echo_server_with(
    cfg: ServerConfig,
) -> (Arc<ResumeListener>, mpsc::UnboundedReceiver<Vec<u8>>) {
    let l = Arc::new(ResumeListener::bind("127.0.0.1:0", cfg).await.unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    let l2 = l.clone();
    tokio::spawn(async move {
        while let Ok(s) = l2.accept().await {
            tokio::spawn(echo(s, tx.clone()));
        }
    });
    (l, rx)
}

fn pattern(seed: u64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| ((i as u64).wrapping_mul(2654435761).wrapping_add(seed) >> 7) as u8)
        .collect()
}

#[tokio::test]
async fn new_session_both_ways_with_half_close() {
    let (l, mut done) = echo_server().await;
    let mut c = Client::new(l.local_addr());
    c.connect().await.unwrap();
    c.send(b"hello\n");
    assert_eq!(c.pump(|c| c.down == b"hello\n").await, Stop::Done);
    c.send(b"world\n");
    c.fin();
    // The up FIN arrives after every byte; the service still writes after it.
    assert_eq!(c.pump(|c| c.down_fin && c.complete()).await, Stop::Done);
    assert_eq!(c.down, b"hello\nworld\nbye\n");
    assert_eq!(done.recv().await.unwrap(), b"hello\nworld\n");

    // The other way round: the service closes first and keeps reading.
    let l = ResumeListener::bind("127.0.0.1:0", server_cfg(AckPolicy::Auto))
        .await
        .unwrap();
    let mut c = Client::new(l.local_addr());
    c.connect().await.unwrap();
    let mut s = l.accept().await.unwrap();
    assert!(!s.is_restored());
    assert_eq!(s.id(), c.id);
    assert_eq!(
        s.client_addr(),
        ClientAddr::Ip("192.0.2.10".parse().unwrap(), 40000)
    );
    s.write_all(b"greeting\n").await.unwrap();
    s.shutdown().await.unwrap();
    assert!(s.write_all(b"x").await.is_err(), "no write after shutdown");
    assert_eq!(c.pump(|c| c.down_fin).await, Stop::Done);
    c.send(b"after your FIN\n");
    c.fin();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        (got, s.consumed(), s.acked())
    });
    assert_eq!(c.pump(|c| c.complete()).await, Stop::Done);
    assert_eq!(c.down, b"greeting\n");
    let (got, consumed, acked) = reader.await.unwrap();
    assert_eq!(got, b"after your FIN\n");
    assert_eq!((consumed, acked), (15, 15));
}

/// `sessions` clients at once (made by `make`), each streaming `len` bytes
/// of `pattern(seed_base + i)` and broken `breaks` times mid-stream with
/// some of it in flight both ways; each must resume exactly, down stream
/// and up stream (what the echo server's sessions report on `done`).
async fn break_and_resume(
    make: impl Fn() -> Client + Clone + Send + 'static,
    done: &mut mpsc::UnboundedReceiver<Vec<u8>>,
    sessions: u64,
    seed_base: u64,
    len: usize,
    breaks: usize,
) {
    let mut tasks = Vec::new();
    for seed in seed_base..seed_base + sessions {
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(seed, len);
            let mut c = make();
            c.connect().await.unwrap();
            let step = data.len() / breaks;
            for k in 0..breaks {
                c.send(&data[k * step..(k + 1) * step]);
                // Mid-stream: some of this step is in flight both ways.
                let target = k * step + step / 2;
                assert_eq!(c.pump(|c| c.down.len() >= target).await, Stop::Done);
                c.drop_leg();
                c.connect().await.unwrap();
                assert!(c.welcome_offset >= target as u64);
            }
            c.fin();
            let mut want = data.clone();
            want.extend_from_slice(b"bye\n");
            assert_eq!(c.pump(|c| c.complete()).await, Stop::Done);
            assert!(c.down == want, "down stream exact for seed {seed}");
            data
        }));
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.push(t.await.unwrap());
    }
    let mut got = Vec::new();
    for _ in 0..sessions {
        got.push(done.recv().await.unwrap());
    }
    sent.sort();
    got.sort();
    assert!(sent == got, "up streams exact");
}

#[tokio::test]
async fn resume_after_transport_breaks_is_exact_both_ways() {
    let (l, mut done) = echo_server().await;
    let addr = l.local_addr().to_owned();
    // Several sessions at once, each broken 20 times mid-stream.
    break_and_resume(move || Client::new(&addr), &mut done, 4, 0, 400_000, 20).await;
}

#[tokio::test]
async fn bad_handshakes_get_their_refuse_code_and_others_carry_on() {
    let (l, _done) = echo_server().await;
    let addr = l.local_addr().to_owned();
    let mut good = Client::new(&addr);
    good.connect().await.unwrap();
    good.send(b"one\n");
    assert_eq!(good.pump(|c| c.down == b"one\n").await, Stop::Done);

    let fresh = |f: &dyn Fn(&mut Hello)| {
        let mut h = hello(rand::random(), false, 0, 0);
        f(&mut h);
        h.encode(&KEY)
    };
    // Wrong magic.
    let mut b = fresh(&|_| {}).to_vec();
    b[5..9].copy_from_slice(b"XXXX");
    assert_eq!(refused(&addr, &b).await, Some(ErrorCode::BadMagic));
    // Unknown versions (this acceptor speaks 1 and 2).
    let b = fresh(&|h| {
        h.version_min = 3;
        h.version_max = 4;
    });
    assert_eq!(
        refused(&addr, &b).await,
        Some(ErrorCode::UnsupportedVersion)
    );
    // Bad token (another key).
    let b = hello(rand::random(), false, 0, 0).encode(&[1u8; 32]);
    assert_eq!(refused(&addr, &b).await, Some(ErrorCode::BadToken));
    // Unknown session (no restore callback).
    let b = hello(rand::random(), true, 1, 0).encode(&KEY);
    assert_eq!(refused(&addr, &b).await, Some(ErrorCode::UnknownSession));
    // A new session reusing a live id.
    let b = hello(good.id, false, 0, 0).encode(&KEY);
    assert_eq!(refused(&addr, &b).await, Some(ErrorCode::SessionExists));
    // Stale epoch: a replay of the good client's last (resume) HELLO.
    good.drop_leg();
    good.connect().await.unwrap();
    let replay = good.last_hello.clone();
    assert_eq!(refused(&addr, &replay).await, Some(ErrorCode::StaleEpoch));
    // Impossible offset: claims down bytes never sent.
    let b = hello(good.id, true, 100, 1_000_000).encode(&KEY);
    assert_eq!(refused(&addr, &b).await, Some(ErrorCode::ImpossibleOffset));
    // Oversize handshake frame.
    assert_eq!(
        refused(&addr, &[1, 0, 0, 0x13, 0x88]).await,
        Some(ErrorCode::FrameTooLarge)
    );
    // A first frame that is not a HELLO.
    assert_eq!(
        refused(&addr, &[0x14, 0, 0, 0, 0]).await,
        Some(ErrorCode::Malformed)
    );
    // Truncated: 3 bytes then EOF: dropped without a REFUSE.
    {
        let mut c = dial(&addr).await;
        c.write_all(&[1, 0, 0]).await.unwrap();
        c.shutdown().await.unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(read_frame(&mut c, &mut buf).await, None);
    }
    // Truncated and left open: REFUSE timeout after handshake_timeout.
    {
        let mut c = dial(&addr).await;
        c.write_all(&[1, 0, 0]).await.unwrap();
        let mut buf = BytesMut::new();
        assert!(matches!(
            read_frame(&mut c, &mut buf).await,
            Some(Frame::Refuse {
                code: ErrorCode::Timeout,
                ..
            })
        ));
    }
    // The good session went on through all of it (the refused epoch-100
    // HELLO did not move its epoch: a resume with epoch 2 still works).
    good.send(b"two\n");
    assert_eq!(good.pump(|c| c.down == b"one\ntwo\n").await, Stop::Done);
    good.drop_leg();
    good.connect().await.unwrap();
    assert_eq!(good.epoch, 2);
    good.fin();
    assert_eq!(good.pump(|c| c.complete()).await, Stop::Done);
    assert_eq!(good.down, b"one\ntwo\nbye\n");
}

#[tokio::test]
async fn manual_acks_unacked_bytes_are_replayed_not_duplicated() {
    let l = ResumeListener::bind("127.0.0.1:0", server_cfg(AckPolicy::Manual))
        .await
        .unwrap();
    let mut c = Client::new(l.local_addr());
    c.connect().await.unwrap();
    let mut s = l.accept().await.unwrap();
    c.send(b"aaa\nbbb\n");
    // Pump the client while the app reads both lines and acks only one.
    let app = tokio::spawn(async move {
        let mut buf = [0u8; 8];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"aaa\nbbb\n");
        assert!(s.ack(9).is_err(), "cannot ack unread bytes");
        s.ack(4).unwrap();
        s
    });
    assert_eq!(c.pump(|c| c.up.acked() == 4).await, Stop::Done);
    let mut s = app.await.unwrap();
    assert_eq!((s.consumed(), s.acked()), (8, 4));
    // Break: the acceptor states its committed offset; the initiator replays.
    c.drop_leg();
    c.connect().await.unwrap();
    assert_eq!(c.welcome_offset, 4, "unacked bytes are asked for again");
    c.send(b"ccc\n");
    c.fin();
    let app = tokio::spawn(async move {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        s.ack(s.consumed()).unwrap();
        s.shutdown().await.unwrap();
        rest
    });
    assert_eq!(c.pump(|c| c.complete()).await, Stop::Done);
    assert_eq!(
        app.await.unwrap(),
        b"ccc\n",
        "replayed bbb is not delivered twice"
    );
    assert_eq!(c.up.acked(), 12);
}

#[tokio::test]
async fn resume_of_a_completed_session_shows_everything_acked() {
    let (l, _done) = echo_server().await;
    let mut c = Client::new(l.local_addr());
    c.connect().await.unwrap();
    c.send(b"x\n");
    c.fin();
    assert_eq!(c.pump(|c| c.complete()).await, Stop::Done);
    c.drop_leg();
    // Completion is recorded once the session task ends: retry until then.
    loop {
        c.connect().await.unwrap();
        if c.welcome_offset == 2 {
            break;
        }
    }
    let pumped = c.pump(|c| c.up.acked() == 2 && c.down_fin).await;
    assert_eq!(pumped, Stop::Done);
}

fn ledger_rt(sock: &str, data: &std::path::Path) -> tokio::runtime::Runtime {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (sock, data) = (sock.to_owned(), data.to_owned());
    rt.spawn(async move {
        ledger::serve(&sock, &data, KEY.to_vec(), None, |a| {
            tx.send(a.to_owned()).unwrap()
        })
        .await
        .unwrap();
    });
    rx.recv_timeout(LIMIT).expect("the ledger listens");
    rt
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_killed_and_restarted_in_process_is_exactly_once() {
    let dir = std::env::temp_dir().join(format!("holdfast-ledger-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = format!("unix:{}", dir.join("ledger.sock").display());
    let mut want = String::new();
    let mut next = 1;
    let mut c = Client::new(&sock);
    for round in 0..5 {
        let rt = tokio::task::block_in_place(|| ledger_rt(&sock, &dir));
        if round == 0 {
            c.connect().await.unwrap();
        } else {
            c.connect().await.unwrap();
            assert!(c.restored, "a restarted ledger restores the session");
        }
        for k in 0..3 {
            c.send(format!("r{round}-{k}\n").as_bytes());
            want.push_str(&format!("ok {next}\n"));
            next += 1;
        }
        // Kill once the last line is committed (acked), whether or not its
        // response arrived: the whole runtime and its sockets go at once.
        let target = c.up.read();
        assert_eq!(c.pump(|c| c.up.acked() == target).await, Stop::Done);
        // Waits until every task (listener, sessions) is dropped.
        tokio::task::block_in_place(|| rt.shutdown_timeout(LIMIT));
        c.drop_leg();
    }
    let rt = tokio::task::block_in_place(|| ledger_rt(&sock, &dir));
    c.connect().await.unwrap();
    c.fin();
    assert_eq!(c.pump(|c| c.complete()).await, Stop::Done);
    assert_eq!(String::from_utf8_lossy(&c.down), want);
    let log = std::fs::read_to_string(dir.join("ledger.log")).unwrap();
    assert_eq!(log.lines().count(), 15, "each line committed once:\n{log}");
    rt.shutdown_background();
    let _ = std::fs::remove_dir_all(&dir);
}

/// TLS settings for a listener: the server certificate for `server.test`
/// and, with `mutual`, client certificates checked against the test CA.
fn tls_cfg(pki: &pki::Pki, serial: u64, mutual: bool) -> TlsConfig {
    let (cert, key) = pki.leaf(
        "server",
        &format!("server {serial}"),
        serial,
        &["server.test"],
    );
    let ca = pki.path("ca.pem");
    TlsConfig::from_pem_files(cert.as_ref(), key.as_ref(), mutual.then_some(ca.as_ref())).unwrap()
}

/// The certificate the acceptor showed on a client's current leg.
fn server_cert(c: &Client) -> Vec<u8> {
    match &c.leg.as_ref().expect("a leg").conn {
        Conn::TlsOut(s) => s.get_ref().1.peer_certificates().unwrap()[0].to_vec(),
        _ => panic!("not a TLS leg"),
    }
}

/// A listener whose rejections are sent to the returned channel.
fn rejections(cfg: &mut ServerConfig) -> mpsc::UnboundedReceiver<Rejection> {
    let (tx, rx) = mpsc::unbounded_channel();
    cfg.on_reject = Some(Arc::new(move |r| {
        let _ = tx.send(r);
    }));
    rx
}

/// Mutual TLS: several sessions, each broken 10 times mid-stream, resume
/// over new TLS connections (a new handshake each) exactly both ways; a
/// certificate rotated with `set_tls` is what the next handshake sees while
/// the session carries on; nothing is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_over_new_tls_connections_exactly() {
    let pki = pki::Pki::new("lib-mtls");
    let (ccert, ckey) = pki.leaf("client", "initiator", 100, &["client.test"]);
    let client_tls = pki.client_config(Some((&ccert, &ckey)));
    let mut cfg = server_cfg(AckPolicy::Auto);
    cfg.tls = Some(tls_cfg(&pki, 1, true));
    let mut rejected = rejections(&mut cfg);
    let (l, mut done) = echo_server_with(cfg).await;
    assert!(l.is_tls());
    let addr = l.local_addr().to_owned();
    {
        let (addr, client_tls) = (addr.clone(), client_tls.clone());
        let make = move || Client::with_tls(&addr, client_tls.clone());
        break_and_resume(make, &mut done, 3, 10, 300_000, 10).await;
    }

    // Rotation: the next handshake (a resume) sees the new certificate.
    let mut c = Client::with_tls(&addr, client_tls.clone());
    c.connect().await.unwrap();
    let first = server_cert(&c);
    c.send(b"before\n");
    assert_eq!(c.pump(|c| c.down == b"before\n").await, Stop::Done);
    l.set_tls(Some(tls_cfg(&pki, 2, true)));
    c.send(b"in flight\n");
    c.drop_leg();
    c.connect().await.unwrap();
    let second = server_cert(&c);
    assert_ne!(
        first, second,
        "the resume's handshake used the new certificate"
    );
    c.fin();
    assert_eq!(c.pump(|c| c.complete()).await, Stop::Done);
    assert_eq!(c.down, b"before\nin flight\nbye\n");
    assert_eq!(done.recv().await.unwrap(), b"before\nin flight\n");
    assert_eq!(rejected.try_recv().ok(), None, "no handshake was rejected");
}

/// Whether a TLS client is kept from the session layer: its handshake
/// fails, or its HELLO gets no WELCOME before the connection ends.
async fn tls_client_refused(addr: &str, tls: &Arc<rustls::ClientConfig>) -> bool {
    let Ok(mut conn) = dial_tls(addr, Some(tls)).await else {
        return true;
    };
    let bytes = hello(rand::random(), false, 0, 0).encode(&KEY);
    if conn.write_all(&bytes).await.is_err() || conn.flush().await.is_err() {
        return true;
    }
    !welcomed(&mut conn).await
}

/// Reads until EOF or an error (bounded in time): whether a WELCOME came.
async fn welcomed(conn: &mut Conn) -> bool {
    let dec = Decoder::new(1 << 20);
    let mut buf = BytesMut::new();
    tokio::time::timeout(LIMIT, async {
        loop {
            if let Ok(Some(Frame::Welcome(_))) = dec.decode(&mut buf) {
                return true;
            }
            match conn.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the acceptor closes a refused connection in time")
}

async fn next_rejection(rx: &mut mpsc::UnboundedReceiver<Rejection>) -> Rejection {
    tokio::time::timeout(LIMIT, rx.recv())
        .await
        .expect("a rejection in time")
        .expect("the listener is alive")
}

/// A mutual-TLS listener refuses a plaintext HFRP client, a client without
/// a certificate, one with a certificate from another CA and a silent one
/// (handshake timeout), each with its `Rejection`; a good session carries
/// on through all of it and resumes over TLS afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_refuses_plaintext_unknown_and_silent_clients() {
    let pki = pki::Pki::new("lib-refuse");
    let other = pki::Pki::new("lib-other");
    let (ccert, ckey) = pki.leaf("client", "initiator", 100, &["client.test"]);
    let (bad_cert, bad_key) = other.leaf("client", "intruder", 7, &["client.test"]);
    let mut cfg = server_cfg(AckPolicy::Auto);
    let mut tls = tls_cfg(&pki, 1, true);
    tls.handshake_timeout = Duration::from_millis(300);
    cfg.tls = Some(tls);
    let mut rejected = rejections(&mut cfg);
    let (l, mut done) = echo_server_with(cfg).await;
    let addr = l.local_addr().to_owned();
    let mut good = Client::with_tls(&addr, pki.client_config(Some((&ccert, &ckey))));
    good.connect().await.unwrap();
    good.send(b"one\n");
    assert_eq!(good.pump(|c| c.down == b"one\n").await, Stop::Done);

    // A plaintext HFRP initiator: its HELLO is not a TLS record.
    let mut plain = dial(&addr).await;
    plain
        .write_all(&hello(rand::random(), false, 0, 0).encode(&KEY))
        .await
        .unwrap();
    assert!(
        !welcomed(&mut plain).await,
        "a plaintext HELLO got a WELCOME"
    );
    assert_eq!(next_rejection(&mut rejected).await, Rejection::TlsHandshake);

    // No client certificate.
    assert!(tls_client_refused(&addr, &pki.client_config(None)).await);
    assert_eq!(next_rejection(&mut rejected).await, Rejection::TlsHandshake);

    // A client certificate signed by another CA.
    let intruder = pki.client_config(Some((&bad_cert, &bad_key)));
    assert!(tls_client_refused(&addr, &intruder).await);
    assert_eq!(next_rejection(&mut rejected).await, Rejection::TlsHandshake);

    // Silent: connects and sends nothing.
    let mut silent = dial(&addr).await;
    assert_eq!(next_rejection(&mut rejected).await, Rejection::TlsTimeout);
    let mut rest = Vec::new();
    let n = tokio::time::timeout(LIMIT, silent.read_to_end(&mut rest))
        .await
        .expect("closed after the timeout");
    assert!(n.is_err() || rest.is_empty(), "nothing but a close");

    // The good session went on, and resumes over a new TLS connection.
    good.send(b"two\n");
    assert_eq!(good.pump(|c| c.down == b"one\ntwo\n").await, Stop::Done);
    good.drop_leg();
    good.connect().await.unwrap();
    good.fin();
    assert_eq!(good.pump(|c| c.complete()).await, Stop::Done);
    assert_eq!(good.down, b"one\ntwo\nbye\n");
    assert_eq!(done.recv().await.unwrap(), b"one\ntwo\n");
    assert_eq!(rejected.try_recv().ok(), None, "one rejection each");
}

/// Echoes what `s` reads until `want` bytes went through (bounded).
async fn echo_n(s: &mut ResumableSession, want: usize) {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < want {
        let k = tokio::time::timeout(LIMIT, s.read(&mut buf))
            .await
            .expect("bytes in time")
            .unwrap();
        assert!(k > 0, "EOF after {n} of {want} bytes");
        s.write_all(&buf[..k]).await.unwrap();
        n += k;
    }
}

/// A live session moved to another listener on the same socket (what a
/// holdfast hand-over does between two processes): parked, exported, and
/// rebuilt there with its transport, it carries on over the same connection
/// (the initiator never reconnects); a later resume reaches the new
/// listener; one that still reaches the old listener is closed unanswered
/// (so the initiator tries again) rather than refused as unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_handed_to_another_listener_keeps_its_transport() {
    let old = ResumeListener::bind("127.0.0.1:0", server_cfg(AckPolicy::Auto))
        .await
        .unwrap();
    let addr = old.local_addr().to_string();
    let mut c = Client::new(&addr);
    c.connect().await.unwrap();
    let first = pattern(1, 3000);
    c.send(&first);
    let mut s = old.accept().await.unwrap();
    let (_, pumped) = tokio::join!(
        echo_n(&mut s, first.len()),
        c.pump(|c| c.down.len() == 3000)
    );
    assert_eq!(pumped, Stop::Done);

    // Bytes in flight both ways while it moves: the initiator's next
    // request, and an answer the old side wrote but the link may not have
    // sent yet.
    let second = pattern(2, 2000);
    c.send(&second);
    s.write_all(b"written before the move;").await.unwrap();
    let parked = s.park_for_handover().await.unwrap();
    let (fd, _) = parked.leg.expect("a plain transport moves");
    let new = ResumeListener::from_listening_fd(
        old.listening_fd().try_clone_to_owned().unwrap(),
        server_cfg(AckPolicy::Auto),
    )
    .unwrap();
    old.pause_accepting();
    let (mut moved, imported) = new.import_session(&parked.state, Some(fd)).unwrap();
    imported.start();
    s.release_handover(true);
    drop(s);

    // The same connection: the initiator's bytes reach the new side, and
    // the answer written before the move arrives once.
    let (_, pumped) = tokio::join!(
        echo_n(&mut moved, second.len()),
        c.pump(|c| c.down.len() == 3000 + 24 + 2000)
    );
    assert_eq!(pumped, Stop::Done);
    let mut want = first.clone();
    want.extend_from_slice(b"written before the move;");
    want.extend_from_slice(&second);
    assert_eq!(c.down, want);

    // A resume on a new connection reaches the new listener.
    c.drop_leg();
    c.connect().await.unwrap();
    let third = pattern(3, 1000);
    c.send(&third);
    let (_, pumped) = tokio::join!(
        echo_n(&mut moved, third.len()),
        c.pump(|c| c.down.len() == want.len() + 1000)
    );
    assert_eq!(pumped, Stop::Done);

    // The old listener, accepting again while the new one pauses: the
    // resume is closed unanswered, not refused.
    new.pause_accepting();
    old.resume_accepting();
    c.drop_leg();
    let mut h = hello(c.id, true, c.epoch + 1, c.down.len() as u64);
    assert_eq!(refused(&addr, &h.encode(&KEY)).await, None);
}

/// Dials and writes `h` (as a version 2 HELLO) and a DATA frame of `data`
/// in one write, before any WELCOME.
async fn with_early_data(addr: &str, h: &mut Hello, data: &'static [u8]) -> Conn {
    h.version_max = 2;
    let mut out = BytesMut::from(&h.encode(&KEY)[..]);
    holdfast::proto::encode(&Frame::Data(Bytes::from_static(data)), &mut out);
    let mut c = dial(addr).await;
    c.write_all(&out).await.unwrap();
    c
}

/// Early data (protocol §3.6): a version 2 initiator writes its HELLO and
/// the new session's first DATA in one write; the acceptor chooses version
/// 2, takes the DATA as the session's first bytes without waiting for more,
/// and the service's answer comes back. On a resume, DATA before the
/// WELCOME is a protocol error: the session is aborted.
#[tokio::test]
async fn early_data_opens_a_new_session_and_is_refused_on_a_resume() {
    let (l, _done) = echo_server().await;
    let addr = l.local_addr().to_string();
    let id = [0x5a; 16];
    let mut h = hello(id, false, 0, 0);
    let mut c = with_early_data(&addr, &mut h, b"GET early\n").await;
    let mut buf = BytesMut::new();
    match read_frame(&mut c, &mut buf).await {
        Some(Frame::Welcome(w)) => {
            w.check(&KEY, &h, 0, 0).unwrap();
            assert_eq!(w.version, 2, "the highest common version");
            assert_eq!(w.recv_offset, 0);
        }
        f => panic!("expected WELCOME, got {f:?}"),
    }
    // The echo of the early bytes, with nothing else sent.
    let mut echoed = Vec::new();
    while echoed.len() < 10 {
        match read_frame(&mut c, &mut buf).await {
            Some(Frame::Data(b)) => echoed.extend_from_slice(&b),
            Some(Frame::Ack(_)) => {}
            f => panic!("expected the echo, got {f:?}"),
        }
    }
    assert_eq!(echoed, b"GET early\n");
    drop(c);

    // A resume of that session with DATA before the WELCOME.
    let mut h = hello(id, true, 1, 10);
    let mut c = with_early_data(&addr, &mut h, b"more\n").await;
    let mut buf = BytesMut::new();
    let mut aborted = None;
    while let Some(f) = read_frame(&mut c, &mut buf).await {
        if let Frame::Abort { code, reason } = f {
            aborted = Some((code, reason));
        }
    }
    let (code, reason) = aborted.expect("an ABORT");
    assert_eq!(code, ErrorCode::Malformed);
    assert!(reason.contains("before the WELCOME"), "{reason}");
}
