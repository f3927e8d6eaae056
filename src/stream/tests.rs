//! Replay buffer and stream accounting against a plain `Vec<u8>` model.

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

#[test]
fn push_send_ack_rewind() {
    let mut s = Stream::new();
    s.push(Bytes::from_static(b"hello "));
    s.push(Bytes::from_static(b"world"));
    assert_eq!(s.next_unsent().unwrap(), &b"hello "[..]);
    s.on_sent(3);
    assert_eq!(s.next_unsent().unwrap(), &b"lo "[..]);
    s.on_sent(3);
    assert_eq!(s.next_unsent().unwrap(), &b"world"[..]);
    assert_eq!(s.ack_to(4), 4);
    assert_eq!(s.buffer().copy_range(4, 11), &b"o world"[..]);
    assert_eq!(s.rewind(), 2);
    assert_eq!(s.next_unsent().unwrap(), &b"o "[..]);
    // An ack beyond sent is clamped; an old ack is ignored.
    assert_eq!(s.ack_to(100), 0);
    s.on_sent(7);
    assert_eq!(s.ack_to(2), 0);
    assert_eq!(s.ack_to(100), 7);
    assert!(s.buffer().is_empty());
    assert_eq!((s.read(), s.sent(), s.acked()), (11, 11, 11));
}

#[test]
fn chunks_are_shared_not_copied() {
    let chunk = Bytes::from(vec![7u8; 4096]);
    let ptr = chunk.as_ptr();
    let mut s = Stream::new();
    s.push(chunk);
    let out = s.next_unsent().unwrap();
    assert_eq!(
        out.as_ptr(),
        ptr,
        "the write shares the replay buffer's memory"
    );
    s.on_sent(100);
    assert_eq!(s.next_unsent().unwrap().as_ptr(), ptr.wrapping_add(100));
}

#[test]
fn chunks_from_for_vectored_writes() {
    let mut b = ReplayBuffer::new(10);
    b.push(Bytes::from_static(b"abc"));
    b.push(Bytes::from_static(b"defg"));
    b.push(Bytes::from_static(b"h"));
    let mut out = Vec::new();
    b.chunks_from(11, 8, &mut out);
    assert_eq!(out, vec![&b"bc"[..], &b"defg"[..], &b"h"[..]]);
    out.clear();
    b.chunks_from(13, 1, &mut out);
    assert_eq!(out, vec![&b"defg"[..]]);
    out.clear();
    b.chunks_from(18, 4, &mut out);
    assert!(out.is_empty());
}

#[test]
fn io_slices_from_borrow_the_chunks() {
    let mut b = ReplayBuffer::new(10);
    b.push(Bytes::from_static(b"abc"));
    b.push(Bytes::from_static(b"defg"));
    b.push(Bytes::from_static(b"h"));
    let mut out = [std::io::IoSlice::new(&[]); 8];
    let n = b.io_slices_from(11, &mut out);
    let got: Vec<&[u8]> = out[..n].iter().map(|s| &s[..]).collect();
    assert_eq!(got, vec![&b"bc"[..], &b"defg"[..], &b"h"[..]]);
    let n = b.io_slices_from(13, &mut out[..1]);
    assert_eq!((n, &out[0][..]), (1, &b"defg"[..]));
    let n = b.io_slices_from(17, &mut out);
    assert_eq!((n, &out[0][..]), (1, &b"h"[..]));
    assert_eq!(b.io_slices_from(18, &mut out), 0);
    assert_eq!(b.io_slices_from(9, &mut out), 0);
    assert_eq!(b.io_slices_from(10, &mut out[..0]), 0);
    let got: Vec<Bytes> = b.chunks_after(12).collect();
    assert_eq!(got, vec![&b"c"[..], &b"defg"[..], &b"h"[..]]);
    assert_eq!(b.chunks_after(18).count(), 0);
    assert_eq!(b.chunks_after(9).count(), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Push(Vec<u8>),
    Send(u64),
    Ack(u64),
    Rewind,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Op::Push),
        (0u64..60).prop_map(Op::Send),
        (0u64..200).prop_map(Op::Ack),
        Just(Op::Rewind),
    ]
}

proptest! {
    /// Any sequence of operations keeps the invariants and the buffer holds
    /// exactly the model's bytes `[acked, read)`.
    #[test]
    fn stream_matches_vec_model(ops in proptest::collection::vec(op(), 0..80)) {
        let mut s = Stream::new();
        let mut model: Vec<u8> = Vec::new();
        let (mut sent, mut acked) = (0u64, 0u64);
        for op in ops {
            match op {
                Op::Push(v) => { model.extend_from_slice(&v); s.push(Bytes::from(v)); }
                Op::Send(n) => {
                    // The destination receives exactly the model's bytes from sent.
                    if let Some(c) = s.next_unsent() {
                        let take = (n as usize).min(c.len());
                        prop_assert_eq!(&c[..take], &model[sent as usize..sent as usize + take]);
                        s.on_sent(take as u64);
                        sent += take as u64;
                    }
                }
                Op::Ack(a) => {
                    let a = acked + a % (sent - acked + 1);
                    s.ack_to(a);
                    acked = a;
                }
                Op::Rewind => { s.rewind(); sent = acked; }
            }
            s.check_invariants();
            prop_assert_eq!((s.read(), s.sent(), s.acked()), (model.len() as u64, sent, acked));
            let held = s.buffer().copy_range(acked, model.len() as u64);
            prop_assert_eq!(&held[..], &model[acked as usize..]);
            let mut chunks = Vec::new();
            s.buffer().chunks_from(sent, usize::MAX, &mut chunks);
            let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            prop_assert_eq!(&joined[..], &model[sent as usize..]);
            let joined: Vec<u8> = s.buffer().chunks_after(sent).flat_map(|c| c.to_vec()).collect();
            prop_assert_eq!(&joined[..], &model[sent as usize..]);
            let mut slices = [std::io::IoSlice::new(&[]); 128];
            let n = s.buffer().io_slices_from(sent, &mut slices);
            let joined: Vec<u8> = slices[..n].iter().flat_map(|c| c.iter().copied()).collect();
            prop_assert_eq!(&joined[..], &model[sent as usize..]);
        }
    }
}
