//! Encode/decode round trips and the decoder's handling of chunked input.

use std::time::Duration;

use bytes::Bytes;
use teleport_protocol::*;

fn all_dtypes_tree() -> Tree {
    let mut map = Map::new();
    for d in DType::ALL {
        let shape = [2usize, 3];
        let data: Vec<u8> = (0..6 * d.size()).map(|i| (i % 2) as u8).collect();
        map.insert(d.name(), Array::new(d, shape, data).unwrap());
    }
    Tree::Map(map)
}

fn sample_messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            agent: "test".into(),
            token: Some("s3cret".into()),
        }),
        Message::Call(Call {
            request_id: 1,
            method: "add".into(),
            timeout: Some(Duration::from_millis(1500)),
            args: tree!({"foo": 1, "bar": 1}),
        }),
        Message::Call(Call {
            request_id: u64::MAX,
            method: String::new(),
            timeout: None,
            args: all_dtypes_tree(),
        }),
        Message::Reply(Reply {
            request_id: 9,
            result: Ok(tree!([
                (Array::from_vec1(vec![1.0f32; 33])),
                (Bytes::from_static(b"raw")),
                (Array::zeros(DType::U8, [0]).unwrap()),
                "",
                (Bytes::new()),
                {},
                [],
                null,
                true,
                (-5),
                2.5
            ])),
        }),
        Message::Reply(Reply {
            request_id: 10,
            result: Err(RemoteError::new(
                ErrorKind::Handler,
                "ValueError",
                "bad value",
            )),
        }),
        Message::Ping { nonce: 3 },
        Message::Pong { nonce: 3 },
        Message::Cancel { request_id: 4 },
        Message::Goodbye(Goodbye {
            reason: GoodbyeReason::ShuttingDown,
            message: "bye".into(),
        }),
    ]
}

#[test]
fn round_trip_whole_and_byte_by_byte() {
    for m in sample_messages() {
        let bytes = encode(&m).unwrap().to_vec();
        assert_eq!(decode_message(&bytes, &Limits::default()).unwrap(), m);
        let mut d = Decoder::new(Limits::default());
        let mut out = None;
        for (i, b) in bytes.iter().enumerate() {
            let mut input = std::slice::from_ref(b);
            let got = d.feed(&mut input).unwrap();
            assert!(input.is_empty());
            if i + 1 < bytes.len() {
                assert!(got.is_none());
                assert!(d.finish().is_err());
            } else {
                out = got;
            }
        }
        assert_eq!(out.unwrap(), m);
        assert!(d.is_at_boundary());
    }
}

#[test]
fn stream_of_messages_in_one_buffer() {
    let msgs = sample_messages();
    let mut all = Vec::new();
    for m in &msgs {
        all.extend(encode(m).unwrap().to_vec());
    }
    let mut d = Decoder::new(Limits::default());
    let mut input = &all[..];
    let mut got = Vec::new();
    while !input.is_empty() {
        if let Some(m) = d.feed(&mut input).unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, msgs);
}

#[test]
fn received_arrays_are_64_byte_aligned_views() {
    let m = &sample_messages()[2];
    let bytes = encode(m).unwrap().to_vec();
    // Feed from an odd offset so the input itself is misaligned.
    let mut padded = vec![0u8; 3];
    padded.extend_from_slice(&bytes);
    let mut input = &padded[3..];
    let got = Decoder::new(Limits::default())
        .feed(&mut input)
        .unwrap()
        .unwrap();
    let Message::Call(c) = got else { panic!() };
    for a in c.args.arrays() {
        assert!(a.is_aligned_to(64), "{a:?}");
    }
    assert_eq!(c.args.get("float64").unwrap().as_array().unwrap().len(), 6);
}

#[test]
fn encode_references_array_buffers() {
    let a = Array::from_vec1(vec![7u64; 1000]);
    let ptr = a.data().as_ptr();
    let m = Message::Call(Call {
        request_id: 0,
        method: "m".into(),
        timeout: None,
        args: tree!({"a": (a.clone())}),
    });
    let e = encode(&m).unwrap();
    assert!(e.chunks().iter().any(|c| c.as_ptr() == ptr));
    assert_eq!(e.len(), e.to_vec().len() as u64);
    assert_eq!(e.chunks()[0].len() % 64, 0);
}

/// Memory carved out of a larger Vec at a chosen distance from 64-byte alignment.
struct Carved {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for Carved {
    fn as_ref(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }
}

impl AsMut<[u8]> for Carved {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }
}

struct TestAllocator {
    misalign: usize,
    calls: std::sync::atomic::AtomicUsize,
}

impl wire::DataAllocator for TestAllocator {
    fn allocate(&self, len: usize) -> Option<Box<dyn wire::DataBuffer>> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let vec = vec![0u8; len + 128];
        let start = (64 - vec.as_ptr() as usize % 64) % 64 + self.misalign;
        Some(Box::new(Carved { vec, start, len }))
    }
}

#[test]
fn data_allocator_is_used_when_aligned_and_skipped_when_not() {
    let m = sample_messages()[2].clone();
    let bytes = encode(&m).unwrap().to_vec();
    for misalign in [0, 8] {
        let alloc = std::sync::Arc::new(TestAllocator {
            misalign,
            calls: Default::default(),
        });
        let mut d = Decoder::new(Limits::default()).with_allocator(alloc.clone());
        let mut input = &bytes[..];
        let got = d.feed(&mut input).unwrap().unwrap();
        assert_eq!(got, m);
        assert_eq!(alloc.calls.load(std::sync::atomic::Ordering::Relaxed), 1);
        let Message::Call(c) = got else { panic!() };
        assert!(c.args.arrays().all(|a| a.is_aligned_to(64)));
    }
}

#[test]
fn feed_bounded_writes_no_more_data_than_allowed_and_gives_the_same_message() {
    let array = teleport_protocol::Array::new(
        teleport_protocol::DType::U8,
        [1000],
        (0..1000u32).map(|i| i as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let message = teleport_protocol::Message::Call(teleport_protocol::Call {
        request_id: 3,
        method: "echo".into(),
        timeout: None,
        args: teleport_protocol::tree!({"a": (array)}),
    });
    let bytes = teleport_protocol::encode(&message).unwrap().to_vec();
    let mut decoder = teleport_protocol::Decoder::new(teleport_protocol::Limits::default());
    let mut input: &[u8] = &bytes;
    // With no allowance the header is consumed and the decoder stops at the
    // data section, with its length known.
    assert_eq!(decoder.feed_bounded(&mut input, 0).unwrap(), None);
    assert_eq!(decoder.data_progress(), Some((0, 1000)));
    assert_eq!(input.len(), 1000);
    let mut out = None;
    while out.is_none() {
        let before = input.len();
        out = decoder.feed_bounded(&mut input, 7).unwrap();
        assert!(before - input.len() <= 7);
        if out.is_none() {
            let (filled, total) = decoder.data_progress().unwrap();
            assert_eq!((filled, total), (1000 - input.len(), 1000));
        }
    }
    assert_eq!(out.unwrap(), message);
    assert!(input.is_empty());
}
