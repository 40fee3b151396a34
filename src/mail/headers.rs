//! The header section of an RFC 5322 message, read without a full parse.
//!
//! Several rooms need "where do the headers end" and "which fields are
//! there" (forged-header stripping, DSNs, POP3 TOP, IMAP HEADER.FIELDS);
//! this is the one place that answers it, for CRLF and bare-LF text alike.

/// One header field: `start..end` spans its first line and every
/// continuation line, line ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Field {
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// Offset of the `:` (or `end` when the line has none).
    pub(crate) colon: usize,
}

impl Field {
    /// The field name, trimmed (empty for a line without a colon).
    pub(crate) fn name<'m>(&self, msg: &'m [u8]) -> &'m [u8] {
        if self.colon >= self.end {
            return b"";
        }
        msg[self.start..self.colon].trim_ascii()
    }

    /// The raw value after the colon, folding and line end included.
    pub(crate) fn value<'m>(&self, msg: &'m [u8]) -> &'m [u8] {
        if self.colon >= self.end {
            return b"";
        }
        &msg[self.colon + 1..self.end]
    }

    /// The whole field as it stands in the message.
    pub(crate) fn raw<'m>(&self, msg: &'m [u8]) -> &'m [u8] {
        &msg[self.start..self.end]
    }

    pub(crate) fn is(&self, msg: &[u8], name: &str) -> bool {
        self.name(msg).eq_ignore_ascii_case(name.as_bytes())
    }
}

/// The fields of the header section and the offset where the body starts
/// (just after the empty line; `msg.len()` when there is no body).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Headers {
    pub(crate) fields: Vec<Field>,
    /// End of the header section: the offset of the empty line, or
    /// `msg.len()` when the message is all headers.
    pub(crate) header_end: usize,
    pub(crate) body_start: usize,
}

/// Split `msg` into header fields and body.
pub(crate) fn scan(msg: &[u8]) -> Headers {
    let mut fields: Vec<Field> = Vec::new();
    let mut pos = 0;
    while pos < msg.len() {
        let line_end = msg[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(msg.len(), |i| pos + i + 1);
        let line = &msg[pos..line_end];
        if line == b"\r\n" || line == b"\n" {
            return Headers {
                fields,
                header_end: pos,
                body_start: line_end,
            };
        }
        match fields.last_mut() {
            Some(last) if line[0] == b' ' || line[0] == b'\t' => last.end = line_end,
            _ => {
                let colon = line
                    .iter()
                    .position(|&b| b == b':')
                    .map_or(line_end, |c| pos + c);
                fields.push(Field {
                    start: pos,
                    end: line_end,
                    colon,
                });
            }
        }
        pos = line_end;
    }
    Headers {
        fields,
        header_end: msg.len(),
        body_start: msg.len(),
    }
}

/// The header section without the empty line (what a DSN quotes).
pub(crate) fn header_fields_only(msg: &[u8]) -> &[u8] {
    &msg[..scan(msg).header_end]
}

/// Where the body starts: just past the empty line (or the end of `msg`).
pub(crate) fn body_start(msg: &[u8]) -> usize {
    scan(msg).body_start
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_folding_and_body() {
        let m = b"Subject: a\r\n b\r\nFrom: x\r\nbogus line\r\n\r\nbody\r\n";
        let h = scan(m);
        assert_eq!(h.fields.len(), 3);
        assert_eq!(h.fields[0].raw(m), b"Subject: a\r\n b\r\n");
        assert_eq!(h.fields[0].name(m), b"Subject");
        assert_eq!(h.fields[2].name(m), b"");
        assert_eq!(&m[h.body_start..], b"body\r\n");
        assert!(header_fields_only(m).ends_with(b"bogus line\r\n"));
    }

    #[test]
    fn bare_lf_and_no_body() {
        let m = b"A: 1\nB: 2\n\nx";
        assert_eq!(&m[body_start(m)..], b"x");
        let m = b"A: 1\r\nB: 2";
        let h = scan(m);
        assert_eq!(h.fields.len(), 2);
        assert_eq!(h.body_start, m.len());
        assert_eq!(body_start(m), m.len());
        assert_eq!(scan(b"").fields.len(), 0);
    }
}
