//! Encoding of IMAP response pieces: strings (quoted or literal), NIL, flag lists, dates.

/// Append `s` as an IMAP string: quoted when it is short 7-bit text without CR/LF/NUL,
/// otherwise as a literal (literals carry any octets).
pub(crate) fn string(out: &mut Vec<u8>, s: &[u8]) {
    let quotable = s.len() <= 1024
        && s.iter()
            .all(|&b| b != 0 && b != b'\r' && b != b'\n' && b < 0x80);
    if quotable {
        out.push(b'"');
        for &b in s {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        literal(out, s);
    }
}

/// Append `s` as a literal.
pub(crate) fn literal(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(format!("{{{}}}\r\n", s.len()).as_bytes());
    out.extend_from_slice(s);
}

/// Append NIL or the string.
pub(crate) fn nstring(out: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"NIL"),
    }
}

/// `(\Seen \Deleted ...)`.
pub(crate) fn flag_list(flags: &[String]) -> String {
    format!("({})", flags.join(" "))
}

/// A message's flags in a FETCH: the stored ones, and `\Recent` if it is recent in this session.
pub(crate) fn msg_flags(flags: &[String], recent: bool) -> String {
    if recent {
        let mut all = flags.to_vec();
        all.push("\\Recent".to_string());
        flag_list(&all)
    } else {
        flag_list(flags)
    }
}

/// INTERNALDATE form: `"27-Nov-2026 02:24:54 +0000"`.
pub(crate) fn internal_date(unix: i64) -> String {
    let dt = chrono::DateTime::from_timestamp(unix, 0).unwrap_or_default();
    format!("\"{}\"", dt.format("%d-%b-%Y %H:%M:%S +0000"))
}

/// Whether `b` may appear in an IMAP atom.
pub(crate) fn is_atom_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
}

/// The tag at the start of a command, if it is a syntactically valid tag.
pub(crate) fn tag_of(cmd: &[u8]) -> Option<&str> {
    let end = cmd
        .iter()
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
        .unwrap_or(cmd.len());
    let tag = &cmd[..end];
    if tag.is_empty() || tag.len() > 64 || !tag.iter().all(|&b| is_atom_char(b) && b != b'+') {
        return None;
    }
    std::str::from_utf8(tag).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings() {
        let mut o = Vec::new();
        string(&mut o, b"a \"b\" \\c");
        assert_eq!(o, b"\"a \\\"b\\\" \\\\c\"");
        let mut o = Vec::new();
        string(&mut o, "é".as_bytes());
        assert_eq!(o, b"{2}\r\n\xc3\xa9");
        assert_eq!(internal_date(0), "\"01-Jan-1970 00:00:00 +0000\"");
        assert_eq!(tag_of(b"a01 NOOP"), Some("a01"));
        assert_eq!(tag_of(b"* NOOP"), None);
    }
}
