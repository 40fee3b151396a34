//! What IMAP FETCH and SEARCH need from a message: ENVELOPE, BODYSTRUCTURE, BODY[section]
//! and header text, built on mail-parser.
//!
//! A full parse decodes every part (base64 attachments included), so what headers-first
//! clients ask for again and again is computed once per held message into a [`Summary`]
//! (kept by `state::Shared` for all sessions); only BODY[part] sections parse again.

use base64::Engine;
use imap_codec::imap_types::fetch::Section;
use mail_parser::{Address, Message, MessageParser, MimeHeaders, PartType};

use crate::mail::headers::body_start as header_end;
use crate::mailbox::imap::resp::{nstring, string};

/// Nesting deeper than this is not described (bounded recursion on hostile input).
const MAX_DEPTH: usize = 16;

/// A message body with its MIME parse (absent when mail-parser could not make anything of it).
pub(crate) struct Parsed<'a> {
    raw: &'a [u8],
    msg: Option<Message<'a>>,
}

pub(crate) fn parse(raw: &[u8]) -> Parsed<'_> {
    // mail-parser has debug assertions on odd structures; a message from outside must not
    // take the session down with it, so a panic there counts as "could not parse".
    let msg = std::panic::catch_unwind(|| MessageParser::default().parse(raw))
        .ok()
        .flatten();
    Parsed { raw, msg }
}

/// A string for a quoted/literal value; non-ASCII text becomes an RFC 2047 encoded word.
fn text_word(s: &str) -> Vec<u8> {
    if s.is_ascii() {
        s.as_bytes().to_vec()
    } else {
        format!(
            "=?utf-8?b?{}?=",
            base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
        )
        .into_bytes()
    }
}

/// Remove folding (CRLF before whitespace) and surrounding space from a raw header value.
fn unfold(s: &str) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().filter(|&b| b != b'\r' && b != b'\n').collect();
    while v.first().is_some_and(|b| b.is_ascii_whitespace()) {
        v.remove(0);
    }
    while v.last().is_some_and(|b| b.is_ascii_whitespace()) {
        v.pop();
    }
    v
}

/// One address structure (RFC 3501 7.4.2: name, source route, mailbox, host). An
/// obsolete source route (`<@relay:user@host>`, RFC 5322 4.4) goes in the route field,
/// so the mailbox name is the local part alone.
fn addr_struct(out: &mut Vec<u8>, name: Option<&str>, address: Option<&str>) {
    out.push(b'(');
    nstring(out, name.map(text_word).as_deref());
    out.push(b' ');
    let (route, address) = match address {
        Some(a) if a.starts_with('@') => match a.split_once(':') {
            Some((route, rest)) => (Some(route), Some(rest)),
            None => (None, Some(a)),
        },
        other => (None, other),
    };
    nstring(out, route.map(str::as_bytes));
    out.push(b' ');
    match address {
        Some(a) => match a.rsplit_once('@') {
            Some((local, host)) => {
                string(out, local.as_bytes());
                out.push(b' ');
                string(out, host.as_bytes());
            }
            None => {
                string(out, a.as_bytes());
                out.extend_from_slice(b" NIL");
            }
        },
        None => out.extend_from_slice(b"NIL NIL"),
    }
    out.push(b')');
}

fn address_list(out: &mut Vec<u8>, addr: Option<&Address<'_>>) {
    let Some(addr) = addr else {
        out.extend_from_slice(b"NIL");
        return;
    };
    let mut inner = Vec::new();
    match addr {
        // An entry without an address is a comment kept as a name (`To: (none)`):
        // as an address structure it would read as a mailbox with no name.
        Address::List(list) => {
            for a in list.iter().filter(|a| a.address.is_some()) {
                addr_struct(&mut inner, a.name.as_deref(), a.address.as_deref());
            }
        }
        Address::Group(groups) => {
            for g in groups {
                if let Some(name) = &g.name {
                    // RFC 3501 group syntax: start (NIL NIL "name" NIL), end (NIL NIL NIL NIL).
                    inner.extend_from_slice(b"(NIL NIL ");
                    string(&mut inner, &text_word(name));
                    inner.extend_from_slice(b" NIL)");
                }
                // A member without an address is a comment the parser kept as
                // a name (`undisclosed-recipients: (none) ;`), not a member.
                for a in g.addresses.iter().filter(|a| a.address.is_some()) {
                    addr_struct(&mut inner, a.name.as_deref(), a.address.as_deref());
                }
                if g.name.is_some() {
                    inner.extend_from_slice(b"(NIL NIL NIL NIL)");
                }
            }
        }
    }
    if inner.is_empty() {
        out.extend_from_slice(b"NIL");
    } else {
        out.push(b'(');
        out.extend_from_slice(&inner);
        out.push(b')');
    }
}

fn envelope_of(out: &mut Vec<u8>, m: &Message<'_>) {
    let raw = |name: &str| m.header_raw(name).map(unfold);
    out.push(b'(');
    nstring(out, raw("Date").as_deref());
    out.push(b' ');
    nstring(out, raw("Subject").as_deref());
    out.push(b' ');
    let from = m.from();
    address_list(out, from);
    out.push(b' ');
    address_list(out, m.sender().or(from));
    out.push(b' ');
    address_list(out, m.reply_to().or(from));
    out.push(b' ');
    address_list(out, m.to());
    out.push(b' ');
    address_list(out, m.cc());
    out.push(b' ');
    address_list(out, m.bcc());
    out.push(b' ');
    nstring(out, raw("In-Reply-To").as_deref());
    out.push(b' ');
    nstring(out, raw("Message-ID").as_deref());
    out.push(b')');
}

fn params(out: &mut Vec<u8>, attrs: Option<&Vec<mail_parser::Attribute<'_>>>) {
    match attrs {
        Some(a) if !a.is_empty() => {
            out.push(b'(');
            for (i, at) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b' ');
                }
                string(out, at.name.as_bytes());
                out.push(b' ');
                string(out, &text_word(&at.value));
            }
            out.push(b')');
        }
        _ => out.extend_from_slice(b"NIL"),
    }
}

fn count_lines(b: &[u8]) -> usize {
    b.iter().filter(|&&c| c == b'\n').count()
}

fn part_body<'m>(m: &'m Message<'_>, idx: usize) -> &'m [u8] {
    match m.parts.get(idx) {
        Some(p) => m
            .raw_message
            .get(p.offset_body as usize..p.offset_end as usize)
            .unwrap_or_default(),
        None => &[],
    }
}

fn part_header<'m>(m: &'m Message<'_>, idx: usize) -> &'m [u8] {
    match m.parts.get(idx) {
        Some(p) => m
            .raw_message
            .get(p.offset_header as usize..p.offset_body as usize)
            .unwrap_or_default(),
        None => &[],
    }
}

/// A multipart's BODYSTRUCTURE: its children, the subtype, and (`ext`) the extension data.
fn multipart_structure(
    out: &mut Vec<u8>,
    m: &Message<'_>,
    part: &mail_parser::MessagePart<'_>,
    children: &[u32],
    ext: bool,
    depth: usize,
) {
    let ct = part.content_type();
    out.push(b'(');
    for &c in children {
        structure_of(out, m, c as usize, ext, depth + 1);
    }
    out.push(b' ');
    let sub = ct
        .and_then(|c| c.c_subtype.as_deref())
        .unwrap_or("mixed")
        .to_ascii_uppercase();
    string(out, sub.as_bytes());
    if ext {
        out.push(b' ');
        params(out, ct.and_then(|c| c.attributes.as_ref()));
        out.push(b' ');
        disposition(out, part);
        out.extend_from_slice(b" NIL NIL");
    }
    out.push(b')');
}

/// message/rfc822 must carry envelope, body and lines; describe an unparsable or
/// too deeply nested one as empty rather than break the syntax.
fn rfc822_tail(
    out: &mut Vec<u8>,
    part: &mail_parser::MessagePart<'_>,
    body: &[u8],
    ext: bool,
    depth: usize,
) {
    out.push(b' ');
    match &part.body {
        PartType::Message(inner) if depth < MAX_DEPTH => {
            envelope_of(out, inner);
            out.push(b' ');
            structure_of(out, inner, 0, ext, depth + 1);
        }
        _ => out.extend_from_slice(
            b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL) (\"TEXT\" \"PLAIN\" NIL NIL NIL \"7BIT\" 0 0)",
        ),
    }
    out.extend_from_slice(format!(" {}", count_lines(body)).as_bytes());
}

/// One part's BODYSTRUCTURE (RFC 3501 7.4.2); `ext` adds the extension data (BODYSTRUCTURE
/// rather than BODY). Nesting beyond `MAX_DEPTH` is described as a leaf.
fn structure_of(out: &mut Vec<u8>, m: &Message<'_>, idx: usize, ext: bool, depth: usize) {
    let Some(part) = m.parts.get(idx) else {
        out.extend_from_slice(b"(\"TEXT\" \"PLAIN\" NIL NIL NIL \"7BIT\" 0 0)");
        return;
    };
    let ct = part.content_type();
    if let PartType::Multipart(children) = &part.body
        && depth < MAX_DEPTH
        && !children.is_empty()
    {
        multipart_structure(out, m, part, children, ext, depth);
        return;
    }
    let (ty, sub) = match ct {
        Some(c) => (
            c.c_type.to_ascii_uppercase(),
            c.c_subtype
                .as_deref()
                .unwrap_or(if c.c_type.eq_ignore_ascii_case("text") {
                    "plain"
                } else {
                    "octet-stream"
                })
                .to_ascii_uppercase(),
        ),
        None => ("TEXT".to_string(), "PLAIN".to_string()),
    };
    let body = part_body(m, idx);
    out.push(b'(');
    string(out, ty.as_bytes());
    out.push(b' ');
    string(out, sub.as_bytes());
    out.push(b' ');
    match ct {
        Some(c) => params(out, c.attributes.as_ref()),
        None if ty == "TEXT" => out.extend_from_slice(b"(\"CHARSET\" \"US-ASCII\")"),
        None => out.extend_from_slice(b"NIL"),
    }
    out.push(b' ');
    nstring(out, part.content_id().map(|s| s.as_bytes()));
    out.push(b' ');
    nstring(out, part.content_description().map(text_word).as_deref());
    out.push(b' ');
    let enc = part
        .content_transfer_encoding()
        .unwrap_or("7bit")
        .to_ascii_uppercase();
    string(out, enc.as_bytes());
    out.extend_from_slice(format!(" {}", body.len()).as_bytes());
    if ty == "TEXT" {
        out.extend_from_slice(format!(" {}", count_lines(body)).as_bytes());
    } else if ty == "MESSAGE" && sub == "RFC822" {
        rfc822_tail(out, part, body, ext, depth);
    }
    if ext {
        out.extend_from_slice(b" NIL ");
        disposition(out, part);
        out.extend_from_slice(b" NIL NIL");
    }
    out.push(b')');
}

fn disposition(out: &mut Vec<u8>, part: &mail_parser::MessagePart<'_>) {
    match part.content_disposition() {
        Some(d) => {
            out.push(b'(');
            string(out, d.c_type.to_ascii_uppercase().as_bytes());
            out.push(b' ');
            params(out, d.attributes.as_ref());
            out.push(b')');
        }
        None => out.extend_from_slice(b"NIL"),
    }
}

/// Resolve a part number path (RFC 3501 6.4.5) to (message owning the part, part index).
fn resolve_root<'m, 'x>(
    m: &'m Message<'x>,
    path: &[u32],
    depth: usize,
) -> Option<(&'m Message<'x>, usize)> {
    let (&first, rest) = path.split_first()?;
    let idx = match &m.parts.first()?.body {
        PartType::Multipart(children) => *children.get((first as usize).checked_sub(1)?)? as usize,
        _ if first == 1 => 0,
        _ => return None,
    };
    descend(m, idx, rest, depth)
}

fn descend<'m, 'x>(
    m: &'m Message<'x>,
    idx: usize,
    path: &[u32],
    depth: usize,
) -> Option<(&'m Message<'x>, usize)> {
    if path.is_empty() {
        return Some((m, idx));
    }
    if depth > MAX_DEPTH {
        return None;
    }
    match &m.parts.get(idx)?.body {
        PartType::Multipart(children) => {
            let c = *children.get((path[0] as usize).checked_sub(1)?)? as usize;
            descend(m, c, &path[1..], depth + 1)
        }
        PartType::Message(inner) => resolve_root(inner, path, depth + 1),
        _ => None,
    }
}

/// The header lines of `header` whose names are (`not` = false) or are not in `names`, then CRLF.
pub(crate) fn header_fields(header: &[u8], names: &[&[u8]], not: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for f in &crate::mail::headers::scan(header).fields {
        // A continuation line with no field before it belongs to none.
        if f.start == 0 && matches!(header.first(), Some(b' ' | b'\t')) {
            continue;
        }
        let listed = names.iter().any(|n| n.eq_ignore_ascii_case(f.name(header)));
        if listed != not {
            let raw = f.raw(header);
            out.extend_from_slice(raw);
            if !raw.ends_with(b"\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Header values SEARCH looks at, lower-cased once (SEARCH compares case-insensitively).
const SEARCHED: [&str; 5] = ["subject", "from", "to", "cc", "bcc"];

/// What FETCH and SEARCH need of a held message but its raw octets, computed once per
/// held message (entries never change while held).
#[derive(Debug)]
pub(crate) struct Summary {
    /// RFC822.SIZE: the octets of the message.
    pub(crate) size: u64,
    /// The header block, including the blank line that ends it.
    pub(crate) header: Vec<u8>,
    pub(crate) envelope: Vec<u8>,
    /// `BODY` (non-extensible) and `BODYSTRUCTURE` values.
    pub(crate) body: Vec<u8>,
    pub(crate) bodystructure: Vec<u8>,
    /// [`Parsed::header_text`] of [`SEARCHED`], lower-cased, in that order.
    searched: [String; 5],
    /// The header block as text, lower-cased (SEARCH TEXT).
    pub(crate) header_lc: String,
    /// [`Parsed::body_text`], lower-cased (SEARCH BODY/TEXT).
    pub(crate) body_text_lc: String,
    pub(crate) sent: Option<chrono::NaiveDate>,
}

impl Summary {
    /// Parse `raw` once and keep what FETCH and SEARCH ask for.
    pub(crate) fn of(raw: &[u8]) -> Summary {
        let p = parse(raw);
        Summary {
            size: raw.len() as u64,
            header: p.header().to_vec(),
            envelope: p.envelope(),
            body: p.structure(false),
            bodystructure: p.structure(true),
            searched: SEARCHED.map(|n| p.header_text(n).to_lowercase()),
            header_lc: String::from_utf8_lossy(p.header()).to_lowercase(),
            body_text_lc: p.body_text().to_lowercase(),
            sent: p.sent_date(),
        }
    }

    /// Roughly what it holds in memory, for the cache's bound.
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of::<Summary>()
            + self.header.len()
            + self.envelope.len()
            + self.body.len()
            + self.bodystructure.len()
            + self.searched.iter().map(String::len).sum::<usize>()
            + self.header_lc.len()
            + self.body_text_lc.len()
    }

    /// The lower-cased [`Parsed::header_text`] of `name`: kept for the usual keys, else
    /// from a parse of the header block alone (no body to decode).
    pub(crate) fn header_text_lc(&self, name: &str) -> std::borrow::Cow<'_, str> {
        match SEARCHED.iter().position(|n| n.eq_ignore_ascii_case(name)) {
            Some(i) => std::borrow::Cow::Borrowed(&self.searched[i]),
            None => std::borrow::Cow::Owned(parse(&self.header).header_text(name).to_lowercase()),
        }
    }

    /// A `BODY[section]` of the top-level header (HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT),
    /// answered from the kept header block; None for sections that need the message.
    pub(crate) fn header_section(&self, section: Option<&Section<'_>>) -> Option<Vec<u8>> {
        match section? {
            Section::Header(None) => Some(self.header.clone()),
            Section::HeaderFields(None, names) | Section::HeaderFieldsNot(None, names) => {
                let not = matches!(section, Some(Section::HeaderFieldsNot(..)));
                let refs: Vec<&[u8]> = names.as_ref().iter().map(|a| a.as_ref()).collect();
                Some(header_fields(&self.header, &refs, not))
            }
            _ => None,
        }
    }
}

impl<'a> Parsed<'a> {
    /// The header block, including the blank line that ends it.
    pub(crate) fn header(&self) -> &'a [u8] {
        &self.raw[..header_end(self.raw)]
    }

    pub(crate) fn text(&self) -> &'a [u8] {
        &self.raw[header_end(self.raw)..]
    }

    /// `ENVELOPE` value.
    pub(crate) fn envelope(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.msg {
            Some(m) => envelope_of(&mut out, m),
            None => out.extend_from_slice(b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"),
        }
        out
    }

    /// `BODYSTRUCTURE` (`ext`) or `BODY` value.
    pub(crate) fn structure(&self, ext: bool) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.msg {
            Some(m) if !m.parts.is_empty() => structure_of(&mut out, m, 0, ext, 0),
            _ => {
                let body = self.text();
                out.extend_from_slice(
                    format!(
                        "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" {} {})",
                        body.len(),
                        count_lines(body)
                    )
                    .as_bytes(),
                );
            }
        }
        out
    }

    /// The octets of `BODY[section]` (before any partial range). Unknown parts give "".
    pub(crate) fn section(&self, section: Option<&Section<'_>>) -> Vec<u8> {
        let Some(section) = section else {
            return self.raw.to_vec();
        };
        let names_of = |v: &imap_codec::imap_types::core::Vec1<
            imap_codec::imap_types::core::AString<'_>,
        >|
         -> Vec<Vec<u8>> {
            v.as_ref()
                .iter()
                .map(|a| AsRef::<[u8]>::as_ref(a).to_vec())
                .collect()
        };
        let path = |p: &imap_codec::imap_types::fetch::Part| -> Vec<u32> {
            p.0.as_ref().iter().map(|n| n.get()).collect()
        };
        // (header block, text) of the message a HEADER/TEXT section refers to.
        let msg_parts =
            |part: Option<&imap_codec::imap_types::fetch::Part>| -> Option<(Vec<u8>, Vec<u8>)> {
                match part {
                    None => Some((self.header().to_vec(), self.text().to_vec())),
                    Some(p) => {
                        let m = self.msg.as_ref()?;
                        let (owner, idx) = resolve_root(m, &path(p), 0)?;
                        match &owner.parts.get(idx)?.body {
                            // The encapsulated message is the part's whole body: its
                            // TEXT runs to the part's end, an inner multipart's epilogue
                            // included (the inner parse's root part ends at its last
                            // boundary).
                            PartType::Message(_) => {
                                let whole = part_body(owner, idx);
                                let h = header_end(whole);
                                Some((whole[..h].to_vec(), whole[h..].to_vec()))
                            }
                            _ => Some((
                                part_header(owner, idx).to_vec(),
                                part_body(owner, idx).to_vec(),
                            )),
                        }
                    }
                }
            };
        let out = match section {
            Section::Header(p) => msg_parts(p.as_ref()).map(|(h, _)| h),
            Section::Text(p) => msg_parts(p.as_ref()).map(|(_, t)| t),
            Section::HeaderFields(p, names) | Section::HeaderFieldsNot(p, names) => {
                let not = matches!(section, Section::HeaderFieldsNot(..));
                msg_parts(p.as_ref()).map(|(h, _)| {
                    let names = names_of(names);
                    let refs: Vec<&[u8]> = names.iter().map(|n| n.as_slice()).collect();
                    header_fields(&h, &refs, not)
                })
            }
            Section::Part(p) => self.msg.as_ref().and_then(|m| {
                let (owner, idx) = resolve_root(m, &path(p), 0)?;
                Some(part_body(owner, idx).to_vec())
            }),
            Section::Mime(p) => self.msg.as_ref().and_then(|m| {
                let (owner, idx) = resolve_root(m, &path(p), 0)?;
                Some(part_header(owner, idx).to_vec())
            }),
        };
        out.unwrap_or_default()
    }

    /// Decoded text of a header (all occurrences joined), for SEARCH.
    pub(crate) fn header_text(&self, name: &str) -> String {
        let mut s = String::new();
        if let Some(m) = &self.msg {
            for (n, v) in m.headers_raw() {
                if n.eq_ignore_ascii_case(name) {
                    s.push_str(v);
                    s.push(' ');
                }
            }
            // Also the decoded forms, so encoded words match their text.
            match name.to_ascii_lowercase().as_str() {
                "subject" => s.push_str(m.subject().unwrap_or_default()),
                "from" | "to" | "cc" | "bcc" => {
                    let a = match name.to_ascii_lowercase().as_str() {
                        "from" => m.from(),
                        "to" => m.to(),
                        "cc" => m.cc(),
                        _ => m.bcc(),
                    };
                    if let Some(a) = a {
                        for x in a.iter() {
                            s.push_str(x.name.as_deref().unwrap_or_default());
                            s.push(' ');
                            s.push_str(x.address.as_deref().unwrap_or_default());
                            s.push(' ');
                        }
                    }
                }
                _ => {}
            }
        } else {
            let h = header_fields(self.header(), &[name.as_bytes()], false);
            s = String::from_utf8_lossy(&h).into_owned();
        }
        s
    }

    /// The sent date: the day the Date header names, in its own zone, not
    /// converted to UTC (RFC 3501 6.4.4 SENTBEFORE/SENTON/SENTSINCE).
    pub(crate) fn sent_date(&self) -> Option<chrono::NaiveDate> {
        let d = self.msg.as_ref()?.date()?;
        chrono::NaiveDate::from_ymd_opt(i32::from(d.year), u32::from(d.month), u32::from(d.day))
    }

    /// The decoded text of the body parts, for SEARCH BODY/TEXT.
    pub(crate) fn body_text(&self) -> String {
        match &self.msg {
            Some(m) => {
                let mut s = String::new();
                for i in 0..m.text_body.len() {
                    if let Some(t) = m.body_text(i) {
                        s.push_str(&t);
                        s.push('\n');
                    }
                }
                for i in 0..m.html_body.len() {
                    if let Some(t) = m.body_html(i) {
                        s.push_str(&t);
                        s.push('\n');
                    }
                }
                s
            }
            None => String::from_utf8_lossy(self.text()).into_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIXED: &[u8] = b"From: \"Eve S\" <eve@evil.test>\r\nTo: alice@example.test, Bob <bob@example.test>\r\nSubject: =?utf-8?q?Caf=C3=A9?= offer\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <m1@evil.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\nworld\r\n--b1\r\nContent-Type: application/pdf; name=\"x.pdf\"\r\nContent-Disposition: attachment; filename=\"x.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--b1--\r\n";

    #[test]
    fn envelope_and_structure() {
        let p = parse(MIXED);
        let env = String::from_utf8(p.envelope()).unwrap();
        assert_eq!(
            env,
            "(\"Thu, 26 Nov 2026 10:00:00 +0000\" \"=?utf-8?q?Caf=C3=A9?= offer\" ((\"Eve S\" NIL \"eve\" \"evil.test\")) ((\"Eve S\" NIL \"eve\" \"evil.test\")) ((\"Eve S\" NIL \"eve\" \"evil.test\")) ((NIL NIL \"alice\" \"example.test\")(\"Bob\" NIL \"bob\" \"example.test\")) NIL NIL NIL \"<m1@evil.test>\")"
        );
        let bs = String::from_utf8(p.structure(true)).unwrap();
        assert!(
            bs.starts_with("((\"TEXT\" \"PLAIN\" (\"charset\" \"utf-8\") NIL NIL \"7BIT\" "),
            "{bs}"
        );
        assert!(bs.contains("(\"APPLICATION\" \"PDF\" (\"name\" \"x.pdf\") NIL NIL \"BASE64\" 8 NIL (\"ATTACHMENT\" (\"filename\" \"x.pdf\")) NIL NIL)"), "{bs}");
        assert!(
            bs.contains(" \"MIXED\" (\"boundary\" \"b1\") NIL NIL NIL)"),
            "{bs}"
        );
        let part = |s: &str| {
            let seq: Vec<std::num::NonZeroU32> = s.split('.').map(|x| x.parse().unwrap()).collect();
            imap_codec::imap_types::fetch::Part(seq.try_into().unwrap())
        };
        assert_eq!(
            p.section(Some(&Section::Part(part("1")))),
            b"hello\r\nworld"
        );
        assert_eq!(p.section(Some(&Section::Part(part("2")))), b"JVBERi0=");
        assert!(
            p.section(Some(&Section::Mime(part("2"))))
                .starts_with(b"Content-Type: application/pdf")
        );
        assert_eq!(p.section(Some(&Section::Part(part("3")))), b"");
        assert!(
            p.section(Some(&Section::Header(None)))
                .ends_with(b"boundary=\"b1\"\r\n\r\n")
        );
        assert!(p.header_text("subject").contains("Café"));
    }

    /// RFC 3501 7.4.2: a group holding only a comment has no member, and a
    /// source route goes to the route field, not into the mailbox name.
    #[test]
    fn envelope_groups_and_routes() {
        let p = parse(
            b"From: <@relay.test:eve@evil.test>\r\nTo: undisclosed-recipients: (none) ;\r\nCc: Team: a@x.test, (just a note) b@x.test;\r\nBcc: (nobody)\r\nSubject: s\r\n\r\nbody\r\n",
        );
        let env = String::from_utf8(p.envelope()).unwrap();
        assert!(
            env.contains(" ((NIL \"@relay.test\" \"eve\" \"evil.test\")) "),
            "{env}"
        );
        assert!(
            env.contains(" ((NIL NIL \"undisclosed-recipients\" NIL)(NIL NIL NIL NIL)) "),
            "{env}"
        );
        assert!(
            env.contains("((NIL NIL \"Team\" NIL)(NIL NIL \"a\" \"x.test\")("),
            "{env}"
        );
        assert!(
            env.contains("\"b\" \"x.test\")(NIL NIL NIL NIL)) NIL NIL NIL)"),
            "Bcc with only a comment is NIL: {env}"
        );
    }

    /// BODY[1.TEXT] of an attached multipart message runs to the part's end,
    /// the inner epilogue included (RFC 3501 6.4.5).
    #[test]
    fn encapsulated_text_keeps_the_epilogue() {
        let raw = b"Subject: outer\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nContent-Type: multipart/alternative; boundary=i\r\n\r\n--i\r\nContent-Type: text/plain\r\n\r\nplain\r\n--i--\r\ninner epilogue\r\n--o--\r\n";
        let p = parse(raw);
        let one = imap_codec::imap_types::fetch::Part(
            vec![std::num::NonZeroU32::new(1).unwrap()]
                .try_into()
                .unwrap(),
        );
        let text = p.section(Some(&Section::Text(Some(one.clone()))));
        assert_eq!(
            String::from_utf8_lossy(&text),
            "--i\r\nContent-Type: text/plain\r\n\r\nplain\r\n--i--\r\ninner epilogue"
        );
        let header = p.section(Some(&Section::Header(Some(one.clone()))));
        assert!(header.ends_with(b"boundary=i\r\n\r\n"), "{header:?}");
        let whole = p.section(Some(&Section::Part(one)));
        assert!(whole.ends_with(b"inner epilogue"), "{whole:?}");
    }

    /// SENTON compares the day the Date header names, in its own zone.
    #[test]
    fn sent_date_is_the_header_own_day() {
        let p = parse(b"Date: Fri, 27 Nov 2026 00:30:00 +0200\r\n\r\nx\r\n");
        assert_eq!(p.sent_date(), chrono::NaiveDate::from_ymd_opt(2026, 11, 27));
    }

    #[test]
    fn header_fields_with_folding() {
        let h = b"Subject: a\r\n b\r\nFrom: x\r\nTo: y\r\n\r\n";
        assert_eq!(
            header_fields(h, &[b"subject", b"TO"], false),
            b"Subject: a\r\n b\r\nTo: y\r\n\r\n"
        );
        assert_eq!(
            header_fields(h, &[b"subject"], true),
            b"From: x\r\nTo: y\r\n\r\n"
        );
    }

    /// Deterministic mutation fuzzing of the MIME paths (no extra crates).
    #[test]
    fn mutated_messages_do_not_panic() {
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let tokens: [&[u8]; 8] = [
            b"--b1",
            b"\r\n",
            b"Content-Type: message/rfc822\r\n",
            b"Content-Type: multipart/mixed; boundary=b1\r\n",
            b"=?utf-8?b?w6k=?=",
            b"\xff",
            b"\"",
            b"(",
        ];
        for _ in 0..400 {
            let mut m = MIXED.to_vec();
            for _ in 0..(rnd() % 8) {
                let pos = (rnd() as usize) % (m.len() + 1);
                match rnd() % 3 {
                    0 => {
                        let t = tokens[(rnd() as usize) % tokens.len()];
                        m.splice(pos..pos, t.iter().copied());
                    }
                    1 if pos < m.len() => {
                        m.remove(pos);
                    }
                    _ => m.truncate(pos),
                }
            }
            let p = parse(&m);
            let _ = p.envelope();
            let _ = p.structure(true);
            let _ = p.body_text();
            for path in [&[1u32][..], &[2], &[2, 1], &[1, 1, 1], &[3]] {
                let seq: Vec<std::num::NonZeroU32> = path
                    .iter()
                    .filter_map(|&n| std::num::NonZeroU32::new(n))
                    .collect();
                if let Ok(v) = seq.try_into() {
                    let part = imap_codec::imap_types::fetch::Part(v);
                    let _ = p.section(Some(&Section::Part(part.clone())));
                    let _ = p.section(Some(&Section::Mime(part.clone())));
                    let _ = p.section(Some(&Section::Header(Some(part))));
                }
            }
        }
    }

    #[test]
    fn garbage_does_not_panic() {
        for raw in [
            &b""[..],
            b"\r\n",
            b"no header",
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n--x--",
            b"\xff\xfe\x00",
        ] {
            let p = parse(raw);
            let _ = p.envelope();
            let _ = p.structure(true);
            let _ = p.section(None);
            let _ = p.body_text();
        }
    }
}
