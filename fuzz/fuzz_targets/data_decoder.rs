//! The DATA decoder over arbitrary bytes in arbitrary chunkings, both
//! `bare_newline` modes, and the dot-stuffing round trip. Input: a mode
//! byte, a chunking seed byte, then the bytes a client sends after 354.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::fuzzing::{DataDecoder, DataStatus, DotStuffer, dot_stuff};

/// Chunk lengths 1..=64 from a tiny LCG, so the same input splits the same way.
fn chunks(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut x = u32::from(seed) | 1;
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = (((x >> 16) % 64) as usize + 1).min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}

/// LF only after CR; CR only before LF (a trailing CR may still be undecided).
fn crlf_only(b: &[u8], trailing_cr_ok: bool) {
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\n' => assert!(
                i > 0 && b[i - 1] == b'\r',
                "bare LF at {i}: {:?}",
                String::from_utf8_lossy(b)
            ),
            b'\r' if i + 1 == b.len() && trailing_cr_ok => {}
            b'\r' => assert_eq!(
                b.get(i + 1),
                Some(&b'\n'),
                "bare CR at {i}: {:?}",
                String::from_utf8_lossy(b)
            ),
            _ => {}
        }
    }
}

/// Decode `parts` in order: (message, status, bytes consumed in all).
fn decode(parts: &[&[u8]], normalize: bool, max: usize) -> (Vec<u8>, DataStatus, usize, bool) {
    let mut d = DataDecoder::new(normalize, max);
    let mut out = Vec::new();
    let mut total = 0;
    let mut status = DataStatus::NeedMore;
    for p in parts {
        let (consumed, st) = d.feed(p, &mut out);
        assert!(consumed <= p.len());
        if st == DataStatus::NeedMore {
            assert_eq!(consumed, p.len(), "NeedMore must take the whole input");
        }
        total += consumed;
        status = st;
        assert!(out.len() <= max, "{} > max {max}", out.len());
        crlf_only(&out, true);
        if st != DataStatus::NeedMore {
            // Final: another feed takes nothing and says the same.
            assert_eq!(d.feed(b"more\r\n.\r\n", &mut out), (0, st));
            break;
        }
    }
    (out, status, total, d.too_big())
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (mode, seed, body) = (data[0], data[1], &data[2..]);
    let normalize = mode & 1 != 0;
    let max = if mode & 2 != 0 { 64 } else { 1 << 20 };

    // 1. Arbitrary bytes: chunking never changes the outcome.
    let whole = decode(&[body], normalize, max);
    let split = decode(&chunks(body, seed), normalize, max);
    assert_eq!(whole, split, "chunking changed the result");
    let (out, status, consumed, too_big) = whole;
    if status == DataStatus::End {
        crlf_only(&out, false);
        assert!(out.is_empty() || out.ends_with(b"\r\n"));
        assert!(body[..consumed].ends_with(b"\r\n.\r\n") || body[..consumed] == *b".\r\n");
    }
    if too_big {
        assert!(out.is_empty());
    }
    if status == DataStatus::BareNewline {
        assert!(!normalize, "Normalize never stops at a bare newline");
    }

    // 2. Round trip: any CRLF text, dot-stuffed, decodes to itself.
    let mut text = Vec::with_capacity(body.len() + 2);
    for &b in body {
        match b {
            b'\r' => {}
            b'\n' => text.extend_from_slice(b"\r\n"),
            b => text.push(b),
        }
    }
    if !text.is_empty() && !text.ends_with(b"\r\n") {
        text.extend_from_slice(b"\r\n");
    }
    let mut stuffed = Vec::new();
    dot_stuff(&text, &mut stuffed);
    for normalize in [false, true] {
        let (out, status, consumed, _) = decode(&chunks(&stuffed, seed), normalize, 1 << 20);
        assert_eq!(status, DataStatus::End);
        assert_eq!(consumed, stuffed.len());
        assert_eq!(out, text, "round trip changed the text");
    }

    // 3. dot_stuff of anything: pure CRLF, ends the data exactly where it
    //    ends, and the chunked stuffer says the same.
    let mut any = Vec::new();
    dot_stuff(body, &mut any);
    crlf_only(&any, false);
    assert!(any.ends_with(b".\r\n"));
    let mut s = DotStuffer::default();
    let mut chunked = Vec::new();
    for c in chunks(body, seed.wrapping_add(1)) {
        s.feed(c, &mut chunked);
    }
    s.finish(&mut chunked);
    assert_eq!(any, chunked, "DotStuffer differs from dot_stuff");
    let (_, status, consumed, _) = decode(&[&any], false, 1 << 20);
    assert_eq!((status, consumed), (DataStatus::End, any.len()));
});
