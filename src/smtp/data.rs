//! SMTP message data, both directions, as pure incremental functions (no I/O).
//!
//! [`DataDecoder`] turns the bytes a client sends after `354` into the
//! message (RFC 5321 4.5.2 dot-unstuffing, the bare CR/LF rules of
//! `[smtp] bare_newline`, the size cap) and says how many input bytes were
//! data, so the shell keeps pipelined commands that follow the final dot.
//! [`dot_stuff`] and [`DotStuffer`] do the opposite for the delivery client
//! and POP3.
//!
//! # Line ends and the end of the data
//!
//! A *real line start* is the first byte of the data or a byte right after
//! a raw CRLF in the input. Only there does a `.` mean anything:
//!
//! - `.\r\n` at a real line start ends the data; it is not part of the
//!   message, which thus ends with its last CRLF (`a\r\n.\r\n` -> `a\r\n`);
//! - `.` followed by anything else on the line is a stuffed dot and is
//!   dropped (`..x` -> `.x`);
//! - a lone `.` whose line ends in a bare CR or LF (only possible with
//!   `Normalize`) is content and is kept: it is not the terminator (that is
//!   `.\r\n` only), and RFC 5321 deletes the first dot only when "there are
//!   other characters on the line".
//!
//! A *bare* LF is one not preceded by CR; a bare CR is one not followed by
//! LF (so a CR at the end of a chunk is undecided until the next byte).
//! `Reject` stops at the first one with [`Status::BareNewline`]. `Normalize`
//! takes it as a line end and writes CRLF, but the line that follows is not
//! a real line start: a `.` there is plain content, neither unstuffed nor an
//! end (`a\n.\r\nMAIL` -> `a\r\n.\r\nMAIL...`, still inside the message).
//!
//! Why `Normalize` cannot smuggle: the data ends exactly where a strict
//! RFC 5321 receiver ends it, at a raw `CRLF . CRLF` in the input, never at
//! `\n.\n`, `\n.\r\n`, `\r.\r` or any other look-alike, so no sender and no
//! upstream relay can make us see a second message where they saw one.
//! Everything we then hold is pure CRLF text, and every later hop sends it
//! through [`dot_stuff`], which doubles the dot of every line (so a kept
//! `.\r\n` content line goes out as `..\r\n`): the next receiver sees the
//! same single message whatever its own bare newline rules are.
//! `\r\r\n.\r\n` does end the data: the CR is bare, but the bytes after it
//! are a raw `CRLF . CRLF`, which every receiver takes as the end.

use crate::config::BareNewline;

/// What [`DataDecoder::feed`] found in the bytes it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// The input ran out inside the data (all of it was consumed): feed more.
    NeedMore,
    /// The final `.\r\n` was read; the message is complete.
    End,
    /// `Reject` met a bare CR or LF. The shell answers `521 5.5.2` and
    /// closes, so the bytes after it do not matter.
    BareNewline,
}

/// The answer of one [`DataDecoder::feed`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Feed {
    /// How many bytes of this input belong to the data. With `End`, the
    /// bytes after them (pipelined commands) are the shell's again; with
    /// `NeedMore` it is the whole input.
    pub(crate) consumed: usize,
    pub(crate) status: Status,
}

/// Where the decoder stands between two bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At a real line start (data start, or right after a raw CRLF).
    LineStart,
    /// Read `.` at a real line start: a stuffed dot or the terminator.
    Dot,
    /// Read `.\r` at a real line start: the terminator if LF follows.
    DotCr,
    /// Inside a line, or at a line start after a bare newline (which is
    /// not a real line start, so a `.` there is content).
    Mid,
    /// Read a CR inside a line: CRLF if LF follows, else a bare CR.
    Cr,
    /// The data ended, or a bare newline was rejected; input is refused.
    Done(Status),
}

/// Decodes the DATA phase of one message, fed in chunks split anywhere.
///
/// States (see the module doc for the rules): `LineStart` is a real line
/// start; `Dot` and `DotCr` hold a leading dot until its line shows whether
/// it is the terminator `.\r\n`, a stuffed dot (dropped) or a lone dot ended
/// by a bare newline (kept); `Mid` copies line content in runs up to the
/// next CR or LF; `Cr` waits for the byte that tells CRLF from a bare CR;
/// `Done` is final. Past `max_size` message bytes it keeps decoding, to find
/// the end, but stores nothing ([`DataDecoder::too_big`]).
#[derive(Debug)]
pub(crate) struct DataDecoder {
    bare: BareNewline,
    max_size: usize,
    /// Message bytes produced so far (never more than `max_size`).
    size: usize,
    too_big: bool,
    state: State,
    /// Content bytes of the current line so far (line end not counted).
    line_len: usize,
    /// A line was longer than [`MAX_LINE`].
    long_line: bool,
    /// Remove NUL bytes instead of keeping them (`nul_bytes = "strip"`).
    strip_nul: bool,
    /// A NUL byte was in the data (stripped or not).
    nul: bool,
}

/// RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF.
pub(crate) const MAX_LINE: usize = 998;

impl DataDecoder {
    /// A decoder for one message of at most `max_size` bytes (as stored:
    /// unstuffed, with CRLF line ends).
    pub(crate) fn new(bare: BareNewline, max_size: usize) -> Self {
        DataDecoder {
            bare,
            max_size,
            size: 0,
            too_big: false,
            state: State::LineStart,
            line_len: 0,
            long_line: false,
            strip_nul: false,
            nul: false,
        }
    }

    /// Drop NUL bytes from the message (they are still reported by [`Self::nul`]).
    pub(crate) fn strip_nul(mut self) -> Self {
        self.strip_nul = true;
        self
    }

    /// Did a line (as stored: unstuffed, without its line end) run past
    /// [`MAX_LINE`] octets?
    pub(crate) fn long_line(&self) -> bool {
        self.long_line
    }

    /// Was there a NUL byte in the data?
    pub(crate) fn nul(&self) -> bool {
        self.nul
    }

    /// `n` more content bytes on the current line.
    fn line_bytes(&mut self, n: usize) {
        self.line_len += n;
        if self.line_len > MAX_LINE {
            self.long_line = true;
        }
    }

    /// Did the message outgrow `max_size`? Then `out` was cleared, its
    /// memory freed, and nothing more is written to it.
    pub(crate) fn too_big(&self) -> bool {
        self.too_big
    }

    /// Decode `input`, appending message bytes to `out` (the same buffer on
    /// every call). After `End` or `BareNewline` every call returns that
    /// status again and consumes nothing.
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Feed {
        if let State::Done(status) = self.state {
            return Feed {
                consumed: 0,
                status,
            };
        }
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::LineStart => {
                    if b == b'.' {
                        self.state = State::Dot;
                        i += 1;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Dot => match b {
                    b'\r' => {
                        self.state = State::DotCr;
                        i += 1;
                    }
                    b'\n' => {
                        i += 1;
                        // A lone dot ended by a bare LF: content, kept.
                        if let Some(f) = self.bare_line_end(b".\r\n", i, out) {
                            return f;
                        }
                    }
                    // A stuffed dot: dropped; the byte is line content.
                    _ => self.state = State::Mid,
                },
                State::DotCr => {
                    if b == b'\n' {
                        self.state = State::Done(Status::End);
                        return Feed {
                            consumed: i + 1,
                            status: Status::End,
                        };
                    }
                    // A lone dot ended by a bare CR; `b` starts the next line.
                    if let Some(f) = self.bare_line_end(b".\r\n", i, out) {
                        return f;
                    }
                }
                State::Cr => {
                    if b == b'\n' {
                        self.emit(b"\r\n", out);
                        self.line_len = 0;
                        self.state = State::LineStart;
                        i += 1;
                    } else if let Some(f) = self.bare_line_end(b"\r\n", i, out) {
                        return f;
                    }
                }
                State::Mid => {
                    if let Some(f) = self.scan_line(input, &mut i, out) {
                        return f;
                    }
                }
                // Not reached: every move to Done returns at once.
                State::Done(status) => {
                    return Feed {
                        consumed: i,
                        status,
                    };
                }
            }
        }
        Feed {
            consumed: input.len(),
            status: Status::NeedMore,
        }
    }

    /// In `Mid`: copy content and raw CRLF line ends in one run, up to a
    /// line that starts with `.`, a lone CR or LF, or the end of the input.
    fn scan_line(&mut self, input: &[u8], i: &mut usize, out: &mut Vec<u8>) -> Option<Feed> {
        let run = *i;
        let mut at = *i;
        loop {
            let Some(p) = input[at..].iter().position(|&b| b == b'\r' || b == b'\n') else {
                self.line_bytes(input.len() - at);
                self.emit(&input[run..], out);
                *i = input.len();
                return None;
            };
            let eol = at + p;
            // `at` is where this line's content began in the input.
            self.line_bytes(eol - at);
            if input[eol] == b'\n' {
                self.emit(&input[run..eol], out);
                *i = eol + 1;
                return self.bare_line_end(b"\r\n", *i, out);
            }
            match input.get(eol + 1) {
                Some(b'\n') => {
                    self.line_len = 0;
                    at = eol + 2;
                    // Keep the run going while the next line cannot start with a dot.
                    if input.get(at).is_some_and(|&b| b != b'.') {
                        continue;
                    }
                    self.emit(&input[run..at], out);
                    self.state = State::LineStart;
                    *i = at;
                    return None;
                }
                Some(_) => {
                    self.emit(&input[run..eol], out);
                    *i = eol + 1;
                    return self.bare_line_end(b"\r\n", *i, out);
                }
                None => {
                    self.emit(&input[run..eol], out);
                    self.state = State::Cr;
                    *i = eol + 1;
                    return None;
                }
            }
        }
    }

    /// A line ended in a bare CR or LF (`consumed` input bytes read so far):
    /// reject, or write `written` (the line's rest and CRLF) and carry on
    /// at a line start that is not a real one.
    fn bare_line_end(
        &mut self,
        written: &[u8],
        consumed: usize,
        out: &mut Vec<u8>,
    ) -> Option<Feed> {
        match self.bare {
            BareNewline::Reject => {
                self.state = State::Done(Status::BareNewline);
                Some(Feed {
                    consumed,
                    status: Status::BareNewline,
                })
            }
            BareNewline::Normalize => {
                self.emit(written, out);
                self.line_len = 0;
                self.state = State::Mid;
                None
            }
        }
    }

    /// Store message bytes, unless the cap is (or would be) passed.
    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.too_big || bytes.is_empty() {
            return;
        }
        if bytes.contains(&0) {
            self.nul = true;
            if self.strip_nul {
                let kept: Vec<u8> = bytes.iter().copied().filter(|&b| b != 0).collect();
                return self.emit(&kept, out);
            }
        }
        if bytes.len() > self.max_size - self.size {
            self.too_big = true;
            *out = Vec::new();
            return;
        }
        out.extend_from_slice(bytes);
        self.size += bytes.len();
    }
}

/// Dot-stuff `body` for sending (RFC 5321 4.5.2) into `out`: every line
/// that starts with `.` gets another, bare CR and bare LF go out as CRLF
/// (RFC 5321 2.3.8: never send them), a non-empty body ends with CRLF, and
/// the terminator `.\r\n` follows.
pub(crate) fn dot_stuff(body: &[u8], out: &mut Vec<u8>) {
    out.reserve(body.len() + body.len() / 64 + 5);
    let mut s = DotStuffer::new();
    s.feed(body, out);
    s.finish(out);
}

/// [`dot_stuff`] fed in chunks split anywhere, for bodies sent piece by piece.
#[derive(Debug)]
pub(crate) struct DotStuffer {
    /// The next byte starts a line (so a `.` there is doubled).
    line_start: bool,
    /// The last byte was a CR, already sent as CRLF: an LF right after it
    /// belongs to that CRLF and is skipped.
    after_cr: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl DotStuffer {
    pub(crate) fn new() -> Self {
        DotStuffer {
            line_start: true,
            after_cr: false,
        }
    }

    /// Stuff one chunk of the body into `out`.
    pub(crate) fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        // Bytes from `run` to `i` go out unchanged.
        let mut run = 0;
        let mut i = 0;
        while i < chunk.len() {
            if self.after_cr {
                self.after_cr = false;
                if chunk[i] == b'\n' {
                    i += 1;
                    run = i;
                    continue;
                }
            }
            if self.line_start {
                self.line_start = false;
                if chunk[i] == b'.' {
                    out.extend_from_slice(&chunk[run..i]);
                    out.push(b'.');
                    run = i;
                }
            }
            let Some(p) = chunk[i..].iter().position(|&b| b == b'\r' || b == b'\n') else {
                break;
            };
            let eol = i + p;
            self.line_start = true;
            if chunk[eol] == b'\r' && chunk.get(eol + 1) == Some(&b'\n') {
                i = eol + 2;
            } else {
                // A bare LF, a bare CR, or a CR whose LF may be in the next chunk.
                out.extend_from_slice(&chunk[run..eol]);
                out.extend_from_slice(b"\r\n");
                self.after_cr = chunk[eol] == b'\r';
                i = eol + 1;
                run = i;
            }
        }
        out.extend_from_slice(&chunk[run..]);
    }

    /// End the body: CRLF if its last line had none, then `.\r\n`.
    pub(crate) fn finish(self, out: &mut Vec<u8>) {
        if !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BareNewline::{Normalize, Reject};

    /// What decoding one input gave, however it was chunked.
    #[derive(Debug, PartialEq, Eq)]
    struct Decoded {
        out: Vec<u8>,
        consumed: usize,
        status: Status,
        too_big: bool,
    }

    /// Decode `input` cut at `cuts` (ascending offsets).
    fn decode_cut(input: &[u8], bare: BareNewline, max: usize, cuts: &[usize]) -> Decoded {
        let mut d = DataDecoder::new(bare, max);
        let mut out = Vec::new();
        let mut start = 0;
        let ends = cuts.iter().copied().chain([input.len()]);
        for end in ends {
            let chunk = &input[start..end];
            let f = d.feed(chunk, &mut out);
            if f.status != Status::NeedMore {
                assert!(f.consumed <= chunk.len());
                return Decoded {
                    out,
                    consumed: start + f.consumed,
                    status: f.status,
                    too_big: d.too_big(),
                };
            }
            assert_eq!(f.consumed, chunk.len(), "NeedMore consumes everything");
            start = end;
        }
        Decoded {
            out,
            consumed: input.len(),
            status: Status::NeedMore,
            too_big: d.too_big(),
        }
    }

    fn decode(input: &[u8], bare: BareNewline) -> Decoded {
        decode_cut(input, bare, 1000, &[])
    }

    /// Decode whole, byte by byte, and cut at every single and every pair of
    /// offsets; all must agree. Returns the whole-input result.
    fn decode_every_split(input: &[u8], bare: BareNewline, max: usize) -> Decoded {
        let whole = decode_cut(input, bare, max, &[]);
        let bytes: Vec<usize> = (1..input.len()).collect();
        assert_eq!(decode_cut(input, bare, max, &bytes), whole, "byte by byte");
        for a in 0..=input.len() {
            assert_eq!(decode_cut(input, bare, max, &[a]), whole, "cut at {a}");
            if input.len() <= 40 {
                for b in a..=input.len() {
                    assert_eq!(decode_cut(input, bare, max, &[a, b]), whole, "cut {a},{b}");
                }
            }
        }
        whole
    }

    fn ends(input: &[u8], bare: BareNewline, out: &[u8], rest: &[u8]) {
        let d = decode_every_split(input, bare, 1000);
        assert_eq!(
            d.status,
            Status::End,
            "{:?}",
            String::from_utf8_lossy(input)
        );
        assert_eq!(d.out, out, "{:?}", String::from_utf8_lossy(&d.out));
        assert_eq!(&input[d.consumed..], rest);
        assert!(!d.too_big);
    }

    fn rejected(input: &[u8]) {
        let d = decode_every_split(input, Reject, 1000);
        assert_eq!(
            d.status,
            Status::BareNewline,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }

    fn stuffed(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        dot_stuff(body, &mut out);
        out
    }

    /// (long_line, nul, out) for `input` cut at every offset in `cuts`,
    /// checked to be the same for the whole input and byte by byte.
    fn flags(input: &[u8], bare: BareNewline, strip: bool) -> (bool, bool, Vec<u8>) {
        let run = |cuts: &[usize]| {
            let mut d = DataDecoder::new(bare, 1 << 20);
            if strip {
                d = d.strip_nul();
            }
            let mut out = Vec::new();
            let mut start = 0;
            for end in cuts.iter().copied().chain([input.len()]) {
                let f = d.feed(&input[start..end], &mut out);
                assert_eq!(f.status == Status::End, end == input.len());
                start = end;
            }
            (d.long_line(), d.nul(), out)
        };
        let whole = run(&[]);
        let bytes: Vec<usize> = (1..input.len()).collect();
        assert_eq!(run(&bytes), whole, "byte by byte");
        for a in [1, 997, 998, 999, 1000, 1001, 1002] {
            if a < input.len() {
                assert_eq!(run(&[a]), whole, "cut at {a}");
            }
        }
        whole
    }

    #[test]
    fn lines_over_998_octets_are_flagged() {
        let line = |n: usize| "x".repeat(n);
        for bare in [Reject, Normalize] {
            let ok = format!("{}\r\n{}\r\n.\r\n", line(998), line(998));
            assert!(!flags(ok.as_bytes(), bare, false).0);
            let long = format!("a\r\n{}\r\n.\r\n", line(999));
            assert!(flags(long.as_bytes(), bare, false).0);
            // A stuffed dot is not part of the stored line.
            let stuffed = format!(".{}\r\n.\r\n", line(998));
            assert!(!flags(stuffed.as_bytes(), bare, false).0);
            let stuffed = format!("..{}\r\n.\r\n", line(998));
            assert!(flags(stuffed.as_bytes(), bare, false).0);
            // The last line before the dot counts too.
            let last = format!("{}\r\n.\r\n", line(5000));
            assert!(flags(last.as_bytes(), bare, false).0);
        }
        // A bare line end under normalize ends the line.
        let norm = format!("{}\n{}\r\n.\r\n", line(998), line(998));
        assert!(!flags(norm.as_bytes(), Normalize, false).0);
    }

    #[test]
    fn nul_bytes_are_flagged_or_stripped() {
        let input = b"a\0b\r\n\0\r\n.\r\n";
        assert_eq!(
            flags(input, Reject, false),
            (false, true, b"a\0b\r\n\0\r\n".to_vec())
        );
        assert_eq!(
            flags(input, Reject, true),
            (false, true, b"ab\r\n\r\n".to_vec())
        );
        assert_eq!(
            flags(b"ab\r\n.\r\n", Reject, true),
            (false, false, b"ab\r\n".to_vec())
        );
    }

    // Ported from the read_body tests in server.rs.

    #[test]
    fn unstuffs_and_stops_at_dot() {
        for bare in [Reject, Normalize] {
            ends(b"a\r\n..b\r\n.\r\nMAIL", bare, b"a\r\n.b\r\n", b"MAIL");
        }
    }

    #[test]
    fn smuggling_is_refused_at_once() {
        rejected(b"hello\n.\nMAIL FROM:<x@y>\r\n.\r\n");
        rejected(b"hello\r\n.\rMAIL\r\n.\r\n");
        // "\n.\r\n" is not the end: it is refused where it stands.
        rejected(b"hi\r\n\n.\r\nRCPT TO:<x@y>\r\n.\r\nNOOP\r\n");
        // Normalize keeps all of it inside one message.
        ends(
            b"hi\r\n\n.\r\nRCPT TO:<x@y>\r\n.\r\nNOOP\r\n",
            Normalize,
            b"hi\r\n\r\n.\r\nRCPT TO:<x@y>\r\n",
            b"NOOP\r\n",
        );
    }

    #[test]
    fn crlf_split_across_reads_is_fine() {
        ends(b"abcdef\r\nx\r\n.\r\n", Reject, b"abcdef\r\nx\r\n", b"");
    }

    #[test]
    fn final_dot_split_across_reads() {
        let input = b"ab\r\n..\r\n.x\r\n.\r\nQUIT\r\n";
        for bare in [Reject, Normalize] {
            ends(input, bare, b"ab\r\n.\r\nx\r\n", b"QUIT\r\n");
            // The old test's buffer capacities: chunks of a fixed size.
            for size in 1..12 {
                let cuts: Vec<usize> = (size..input.len()).step_by(size).collect();
                let d = decode_cut(input, bare, 1000, &cuts);
                assert_eq!(d.out, b"ab\r\n.\r\nx\r\n", "chunk size {size}");
                assert_eq!(&input[d.consumed..], b"QUIT\r\n", "chunk size {size}");
            }
        }
    }

    #[test]
    fn too_big_is_flagged() {
        let mut input = vec![b'x'; 2000];
        input.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
        let mut d = DataDecoder::new(Reject, 1000);
        let mut out = Vec::new();
        let f = d.feed(&input, &mut out);
        assert_eq!(f.status, Status::End);
        assert_eq!(&input[f.consumed..], b"QUIT\r\n");
        assert!(d.too_big());
        assert!(out.is_empty());
        assert_eq!(out.capacity(), 0, "the buffer is freed");
    }

    // The end of the data.

    #[test]
    fn empty_message_and_last_crlf() {
        for bare in [Reject, Normalize] {
            ends(b".\r\nQUIT\r\n", bare, b"", b"QUIT\r\n");
            ends(b"a\r\n.\r\n", bare, b"a\r\n", b"");
            ends(b"\r\n.\r\n", bare, b"\r\n", b"");
            ends(b"a\r\n\r\n.\r\nx", bare, b"a\r\n\r\n", b"x");
        }
    }

    #[test]
    fn dots_that_are_not_the_end() {
        for bare in [Reject, Normalize] {
            // ".." is a stuffed lone dot; ". " and ".x" lose their first dot.
            ends(
                b"..\r\n. \r\n.x.\r\n...\r\n.\r\n",
                bare,
                b".\r\n \r\nx.\r\n..\r\n",
                b"",
            );
            // A dot inside a line is content.
            ends(b"a.\r\na\r\n.\r\n", bare, b"a.\r\na\r\n", b"");
            // ".\r\n" not at a line start is content.
            ends(b"a.\r\n.\r\n", bare, b"a.\r\n", b"");
        }
    }

    #[test]
    fn input_without_end_needs_more() {
        for input in [
            &b""[..],
            b"a",
            b"a\r",
            b"a\r\n",
            b"a\r\n.",
            b"a\r\n.\r",
            b"a\r\n..\r\n",
        ] {
            let d = decode_every_split(input, Reject, 1000);
            assert_eq!(d.status, Status::NeedMore, "{input:?}");
            assert_eq!(d.consumed, input.len());
        }
    }

    #[test]
    fn finished_decoder_takes_nothing_more() {
        let mut d = DataDecoder::new(Reject, 1000);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"a\r\n.\r\nb", &mut out).status, Status::End);
        let f = d.feed(b"more\r\n", &mut out);
        assert_eq!((f.consumed, f.status), (0, Status::End));
        assert_eq!(out, b"a\r\n");

        let mut d = DataDecoder::new(Reject, 1000);
        assert_eq!(d.feed(b"a\nb", &mut out).status, Status::BareNewline);
        let f = d.feed(b"\r\n.\r\n", &mut out);
        assert_eq!((f.consumed, f.status), (0, Status::BareNewline));
    }

    // Bare CR and LF.

    #[test]
    fn cr_at_chunk_end_is_undecided() {
        let mut d = DataDecoder::new(Reject, 1000);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"a\r", &mut out).status, Status::NeedMore);
        let f = d.feed(b"\n.\r\n", &mut out);
        assert_eq!((f.consumed, f.status), (4, Status::End));
        assert_eq!(out, b"a\r\n");

        let mut d = DataDecoder::new(Reject, 1000);
        assert_eq!(d.feed(b"a\r", &mut out).status, Status::NeedMore);
        assert_eq!(d.feed(b"b", &mut out).status, Status::BareNewline);
    }

    #[test]
    fn reject_stops_at_the_first_bare_newline() {
        let d = decode(b"ab\ncd\r\n.\r\n", Reject);
        assert_eq!((d.status, d.consumed), (Status::BareNewline, 3));
        // A bare CR is known at the byte after it.
        let d = decode(b"ab\rcd\r\n.\r\n", Reject);
        assert_eq!(d.status, Status::BareNewline);
        assert!(d.consumed <= 3);
        for input in [
            &b"\n"[..],
            b"\rx",
            b"\r\r\n",
            b"a\r\n\n",
            b".\n",
            b".\rx",
            b"..\n",
        ] {
            rejected(input);
        }
    }

    /// Every look-alike of the terminator: refused by Reject; content inside
    /// the one message by Normalize, which ends only at the real CRLF.CRLF.
    #[test]
    fn smuggling_variants() {
        let variants: [&[u8]; 6] = [
            b"a\n.\nMAIL FROM:<x@y>\r\n",
            b"a\r.\rMAIL FROM:<x@y>\r\n",
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\rMAIL FROM:<x@y>\r\n",
            b"a\r\nb\n.\r\nMAIL FROM:<x@y>\r\n",
        ];
        let outputs: [&[u8]; 6] = [
            b"a\r\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\nb\r\n.\r\nMAIL FROM:<x@y>\r\n",
        ];
        for (v, want) in variants.iter().zip(outputs) {
            let mut input = v.to_vec();
            input.extend_from_slice(b".\r\nNOOP\r\n");
            rejected(&input);
            ends(&input, Normalize, want, b"NOOP\r\n");
            // The stored message goes out with that dot line stuffed.
            let mut resent = stuffed(want);
            resent.extend_from_slice(b"NOOP\r\n");
            ends(&resent, Reject, want, b"NOOP\r\n");
        }
    }

    #[test]
    fn normalize_writes_crlf_only() {
        ends(
            b"a\nb\rc\r\r\nd\n\n.\r\n.\r\n",
            Normalize,
            b"a\r\nb\r\nc\r\n\r\nd\r\n\r\n.\r\n",
            b"",
        );
        // A dot after a bare newline is content: kept, and not unstuffed.
        ends(b"a\n..b\r\n.\r\n", Normalize, b"a\r\n..b\r\n", b"");
        ends(b".\n.\r\n.\r\n", Normalize, b".\r\n.\r\n", b"");
        // The CR is bare, but a raw CRLF.CRLF follows it: that is the end.
        ends(b"a\r\r\n.\r\nx", Normalize, b"a\r\n\r\n", b"x");
        // A bare CR just before the terminator's dot line.
        ends(b"a\r.\r\n.\r\n", Normalize, b"a\r\n.\r\n", b"");
    }

    #[test]
    fn nul_bytes_pass_unchanged() {
        for bare in [Reject, Normalize] {
            ends(
                b"a\0b\r\n\0\r\n.\0\r\n.\r\n",
                bare,
                b"a\0b\r\n\0\r\n\0\r\n",
                b"",
            );
        }
    }

    // The size cap.

    #[test]
    fn size_cap_counts_message_bytes() {
        // "..\r\n" stores 3 bytes: exactly at the cap is fine.
        let d = decode_every_split(b"..\r\n.\r\nQ", Reject, 3);
        assert_eq!(
            (d.status, d.too_big, d.out.as_slice()),
            (Status::End, false, &b".\r\n"[..])
        );
        let d = decode_every_split(b"..\r\nx\r\n.\r\nQ", Reject, 4);
        assert_eq!((d.status, d.too_big), (Status::End, true));
        assert!(d.out.is_empty());
        assert_eq!(d.consumed, 10);
        // Normalised line ends count as stored: "a\n\r\n" is 5 bytes.
        let d = decode_every_split(b"a\n\r\n.\r\n", Normalize, 4);
        assert_eq!((d.status, d.too_big), (Status::End, true));
        // A cap of 0 makes a sink that still finds the end.
        let d = decode_every_split(b"abc\r\n.\r\nQUIT\r\n", Reject, 0);
        assert_eq!((d.status, d.too_big, d.consumed), (Status::End, true, 8));
        let d = decode_every_split(b".\r\n", Reject, 0);
        assert_eq!((d.status, d.too_big), (Status::End, false));
    }

    #[test]
    fn too_big_still_rejects_bare_newlines() {
        let d = decode_every_split(b"xxxxxx\r\nb\nc\r\n.\r\n", Reject, 3);
        assert_eq!((d.status, d.too_big), (Status::BareNewline, true));
    }

    // Dot-stuffing.

    #[test]
    fn dot_stuff_basics() {
        assert_eq!(stuffed(b""), b".\r\n");
        assert_eq!(stuffed(b"a"), b"a\r\n.\r\n");
        assert_eq!(stuffed(b"a\r\n"), b"a\r\n.\r\n");
        assert_eq!(stuffed(b"."), b"..\r\n.\r\n");
        assert_eq!(
            stuffed(b".\r\n..x\r\na.b\r\n"),
            b"..\r\n...x\r\na.b\r\n.\r\n"
        );
        assert_eq!(stuffed(b"\r\n.\r\n"), b"\r\n..\r\n.\r\n");
        assert_eq!(stuffed(b"a\0\r\n"), b"a\0\r\n.\r\n");
    }

    #[test]
    fn dot_stuff_sends_no_bare_newline() {
        assert_eq!(stuffed(b"a\n.b"), b"a\r\n..b\r\n.\r\n");
        assert_eq!(stuffed(b"a\r.b\r"), b"a\r\n..b\r\n.\r\n");
        assert_eq!(stuffed(b"a\r\r\n.\n\n"), b"a\r\n\r\n..\r\n\r\n.\r\n");
        assert_eq!(stuffed(b"\n"), b"\r\n.\r\n");
    }

    #[test]
    fn dot_stuffer_any_chunking_matches_whole() {
        let body = b".a\r\n..\rb\n.\r\r\n.c\r\n\r\n.";
        let whole = stuffed(body);
        for a in 0..=body.len() {
            for b in a..=body.len() {
                let mut s = DotStuffer::new();
                let mut out = Vec::new();
                s.feed(&body[..a], &mut out);
                s.feed(&body[a..b], &mut out);
                s.feed(&body[b..], &mut out);
                s.finish(&mut out);
                assert_eq!(out, whole, "cuts {a},{b}");
            }
        }
        let mut s = DotStuffer::new();
        let mut out = Vec::new();
        for byte in body {
            s.feed(std::slice::from_ref(byte), &mut out);
        }
        s.finish(&mut out);
        assert_eq!(out, whole, "byte by byte");
    }

    // Properties over random inputs (`crate::testing`: a fixed-seed
    // generator; `POSTERN_PROPTEST_SCALE=N` soaks N times as long:
    // `cargo test --release --lib smtp::data::tests::property`).
    use crate::testing::{Rng, scaled};

    fn has_bare_newline(s: &[u8]) -> bool {
        s.iter().enumerate().any(|(i, &b)| {
            (b == b'\r' && s.get(i + 1) != Some(&b'\n'))
                || (b == b'\n' && (i == 0 || s[i - 1] != b'\r'))
        })
    }

    /// A CRLF text of random lines, many starting with dots; sometimes the
    /// last line has no CRLF. Returns the text and what decoding its
    /// stuffed form must give.
    fn random_text(rng: &mut Rng) -> (Vec<u8>, Vec<u8>) {
        let mut text = Vec::new();
        let lines = rng.below(8);
        for n in 0..lines {
            let dots = rng.below(2) * (1 + rng.below(3));
            text.extend(std::iter::repeat_n(b'.', dots));
            for _ in 0..rng.below(10) {
                text.push(rng.pick(b"..a \0\xff:"));
            }
            if n + 1 < lines || rng.below(4) != 0 {
                text.extend_from_slice(b"\r\n");
            }
        }
        let mut want = text.clone();
        if !want.is_empty() && !want.ends_with(b"\r\n") {
            want.extend_from_slice(b"\r\n");
        }
        (text, want)
    }

    #[test]
    fn property_decode_undoes_dot_stuff() {
        let (rounds, seed) = scaled(3000, 0x9e37_79b9_7f4a_7c15);
        let mut rng = Rng(seed);
        for _ in 0..rounds {
            let (text, want) = random_text(&mut rng);
            let mut wire = stuffed(&text);
            let data_len = wire.len();
            wire.extend_from_slice(b"QUIT\r\n");
            for bare in [Reject, Normalize] {
                let mut chunkings = vec![vec![], (1..wire.len()).collect::<Vec<_>>()];
                for _ in 0..4 {
                    chunkings.push(rng.cuts(wire.len()));
                }
                for cuts in chunkings {
                    let d = decode_cut(&wire, bare, 1 << 20, &cuts);
                    assert_eq!(d.status, Status::End, "{text:?} cut {cuts:?}");
                    assert_eq!(d.out, want, "{text:?} cut {cuts:?}");
                    assert_eq!(d.consumed, data_len, "{text:?} cut {cuts:?}");
                }
            }
        }
    }

    /// Line-at-a-time model of the rules in the module doc, written apart
    /// from the decoder. `None` when the input ends inside the data.
    fn model(input: &[u8], bare: BareNewline) -> Option<(Status, Vec<u8>, usize)> {
        let mut out = Vec::new();
        let mut i = 0;
        let mut real_start = true;
        loop {
            let rest = &input[i..];
            if real_start && rest.starts_with(b".\r\n") {
                return Some((Status::End, out, i + 3));
            }
            let p = rest.iter().position(|&b| b == b'\r' || b == b'\n')?;
            let crlf = match (rest[p], rest.get(p + 1)) {
                (b'\r', None) => return None,
                (b'\r', Some(b'\n')) => true,
                _ => false,
            };
            if !crlf && bare == Reject {
                return Some((Status::BareNewline, Vec::new(), 0));
            }
            let mut line = &rest[..p];
            if real_start && line.len() > 1 && line[0] == b'.' {
                line = &line[1..];
            }
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
            i += p + if crlf { 2 } else { 1 };
            real_start = crlf;
        }
    }

    #[test]
    fn property_random_bytes_follow_the_rules() {
        let (rounds, seed) = scaled(5000, 0x2545_f491_4f6c_dd1d);
        let mut rng = Rng(seed);
        for _ in 0..rounds {
            let mut input: Vec<u8> = (0..rng.below(24))
                .map(|_| rng.pick(b"\r\n\r\n..a\0"))
                .collect();
            input.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
            let mut chunkings = vec![vec![], (1..input.len()).collect::<Vec<_>>()];
            for _ in 0..4 {
                chunkings.push(rng.cuts(input.len()));
            }
            let norm = decode(&input, Normalize);
            // Normalize always ends, at the first raw CRLF.CRLF, with pure CRLF text.
            assert_eq!(norm.status, Status::End, "{input:?}");
            assert!(
                !has_bare_newline(&norm.out),
                "{input:?} gave {:?}",
                norm.out
            );
            assert!(norm.out.is_empty() || norm.out.ends_with(b"\r\n"));
            assert_eq!(
                model(&input, Normalize),
                Some((Status::End, norm.out.clone(), norm.consumed))
            );
            // Reject flags exactly the data that holds a bare CR or LF.
            let rej = decode(&input, Reject);
            if has_bare_newline(&input[..norm.consumed]) {
                assert_eq!(rej.status, Status::BareNewline, "{input:?}");
            } else {
                assert_eq!(rej, norm, "{input:?}");
            }
            assert_eq!(model(&input, Reject).map(|m| m.0), Some(rej.status));
            for cuts in chunkings {
                assert_eq!(
                    decode_cut(&input, Normalize, 1000, &cuts),
                    norm,
                    "{input:?} {cuts:?}"
                );
                let r = decode_cut(&input, Reject, 1000, &cuts);
                assert_eq!(r.status, rej.status, "{input:?} {cuts:?}");
                if r.status == Status::End {
                    assert_eq!(r, rej);
                }
            }
            // Re-sending what Normalize stored gives it back, through Reject.
            let mut wire = stuffed(&norm.out);
            assert!(!has_bare_newline(&wire));
            let len = wire.len();
            wire.extend_from_slice(b"NOOP\r\n");
            let again = decode(&wire, Reject);
            assert_eq!((again.status, again.consumed), (Status::End, len));
            assert_eq!(again.out, norm.out);
        }
    }

    #[test]
    fn property_dot_stuff_of_any_bytes_is_clean() {
        let (rounds, seed) = scaled(3000, 0xdead_beef_cafe_f00d);
        let mut rng = Rng(seed);
        for _ in 0..rounds {
            let body: Vec<u8> = (0..rng.below(20)).map(|_| rng.pick(b"\r\n.a\0")).collect();
            let wire = stuffed(&body);
            assert!(!has_bare_newline(&wire), "{body:?}");
            let d = decode(&wire, Reject);
            assert_eq!(
                (d.status, d.consumed),
                (Status::End, wire.len()),
                "{body:?}"
            );
            // What arrives is the body with its line ends made CRLF: the
            // same as Normalize makes of the body sent unstuffed.
            let mut raw = body.clone();
            if !raw.is_empty() && !raw.ends_with(b"\n") && !raw.ends_with(b"\r") {
                raw.extend_from_slice(b"\r\n");
            }
            let mut want = Vec::new();
            let mut prev_cr = false;
            for &b in &raw {
                match b {
                    b'\r' => want.extend_from_slice(b"\r\n"),
                    b'\n' if prev_cr => {}
                    b'\n' => want.extend_from_slice(b"\r\n"),
                    _ => want.push(b),
                }
                prev_cr = b == b'\r';
            }
            assert_eq!(d.out, want, "{body:?}");
        }
    }
}
