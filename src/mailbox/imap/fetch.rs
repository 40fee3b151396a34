//! FETCH and UID FETCH (RFC 3501 6.4.5): the data items of each message, read from the
//! store only when an item needs the message itself. A non-PEEK body item sets `\Seen`.
//! Envelope, body structures, sizes and top-level header sections come from the message's
//! [`Summary`], computed once per held message (`state::Shared::summary`).

use std::borrow::Cow;

use imap_codec::imap_types::core::{AString, Vec1};
use imap_codec::imap_types::fetch::{
    Macro, MacroOrMessageDataItemNames, MessageDataItemName, Part, Section,
};
use imap_codec::imap_types::sequence::SequenceSet;

use super::core::{ImapCore, Step, tagged, unavailable};
use crate::mail::headers::body_start as header_end;
use crate::mailbox::imap::message::{self, Parsed, Summary};
use crate::mailbox::imap::resp::{self, internal_date, is_atom_char, msg_flags};
use crate::mailbox::imap::state::{FlagOp, ViewMsg, normalize};
use crate::mailbox::store::QuarantineError;

fn part_label(p: &Part) -> String {
    p.0.as_ref()
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(".")
}

/// Header field names as the client may see them echoed: atoms bare, others quoted.
fn names_label(v: &Vec1<AString<'_>>) -> String {
    v.as_ref()
        .iter()
        .map(|a| {
            let b: &[u8] = a.as_ref();
            if !b.is_empty() && b.iter().all(|&c| is_atom_char(c)) {
                String::from_utf8_lossy(b).into_owned()
            } else {
                let mut o = Vec::new();
                resp::string(&mut o, b);
                String::from_utf8_lossy(&o).into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The section as it is echoed in `BODY[...]` (RFC 3501 7.4.2).
fn section_label(section: Option<&Section<'_>>) -> String {
    let with = |p: Option<&Part>, s: &str| match p {
        Some(p) => format!("{}.{s}", part_label(p)),
        None => s.to_string(),
    };
    match section {
        None => String::new(),
        Some(Section::Part(p)) => part_label(p),
        Some(Section::Header(p)) => with(p.as_ref(), "HEADER"),
        Some(Section::HeaderFields(p, n)) => {
            with(p.as_ref(), &format!("HEADER.FIELDS ({})", names_label(n)))
        }
        Some(Section::HeaderFieldsNot(p, n)) => with(
            p.as_ref(),
            &format!("HEADER.FIELDS.NOT ({})", names_label(n)),
        ),
        Some(Section::Text(p)) => with(p.as_ref(), "TEXT"),
        Some(Section::Mime(p)) => format!("{}.MIME", part_label(p)),
    }
}

/// The items a macro stands for (RFC 3501 6.4.5); UID FETCH always includes UID.
fn expand_items(what: MacroOrMessageDataItemNames<'_>, uid: bool) -> Vec<MessageDataItemName<'_>> {
    let mut items = match what {
        MacroOrMessageDataItemNames::Macro(m) => {
            let mut v = vec![
                MessageDataItemName::Flags,
                MessageDataItemName::InternalDate,
                MessageDataItemName::Rfc822Size,
            ];
            match m {
                Macro::Fast => {}
                Macro::All => v.push(MessageDataItemName::Envelope),
                Macro::Full => {
                    v.push(MessageDataItemName::Envelope);
                    v.push(MessageDataItemName::Body);
                }
                _ => {}
            }
            v
        }
        MacroOrMessageDataItemNames::MessageDataItemNames(v) => v,
    };
    if uid && !items.contains(&MessageDataItemName::Uid) {
        items.insert(0, MessageDataItemName::Uid);
    }
    items
}

/// What a `BODY[section]` needs: the kept header block answers the top-level header
/// sections; the whole message and its TEXT need the octets; a part needs a MIME parse.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Need {
    Nothing,
    Summary,
    Raw,
    Parse,
}

fn section_need(section: Option<&Section<'_>>) -> Need {
    match section {
        None | Some(Section::Text(None)) => Need::Raw,
        Some(Section::Header(None) | Section::HeaderFields(None, _))
        | Some(Section::HeaderFieldsNot(None, _)) => Need::Summary,
        Some(_) => Need::Parse,
    }
}

fn item_need(item: &MessageDataItemName<'_>) -> Need {
    match item {
        MessageDataItemName::Rfc822Size
        | MessageDataItemName::Envelope
        | MessageDataItemName::Body
        | MessageDataItemName::BodyStructure
        | MessageDataItemName::Rfc822Header => Need::Summary,
        MessageDataItemName::Rfc822 | MessageDataItemName::Rfc822Text => Need::Raw,
        MessageDataItemName::BodyExt { section, .. } => section_need(section.as_ref()),
        _ => Need::Nothing,
    }
}

/// What a FETCH asks of each message, decided once for the command.
struct Plan<'a> {
    items: Vec<MessageDataItemName<'a>>,
    /// Some item needs the message's [`Summary`] (kept across commands and sessions).
    needs_summary: bool,
    /// Some item needs the message's octets.
    needs_raw: bool,
    /// Some item needs a MIME parse (a part section).
    needs_parse: bool,
    /// Some item reads the body without PEEK, which sets `\Seen`.
    marks_seen: bool,
}

impl<'a> Plan<'a> {
    fn new(what: MacroOrMessageDataItemNames<'a>, uid: bool) -> Plan<'a> {
        let items = expand_items(what, uid);
        let needs = |n: Need| items.iter().any(|i| item_need(i) == n);
        let (needs_summary, needs_raw, needs_parse) =
            (needs(Need::Summary), needs(Need::Raw), needs(Need::Parse));
        let marks_seen = items.iter().any(|i| {
            matches!(
                i,
                MessageDataItemName::BodyExt { peek: false, .. }
                    | MessageDataItemName::Rfc822
                    | MessageDataItemName::Rfc822Text
                    | MessageDataItemName::Binary { peek: false, .. }
            )
        });
        Plan {
            items,
            needs_summary,
            needs_raw: needs_raw || needs_parse,
            needs_parse,
            marks_seen,
        }
    }
}

/// What one message's items are rendered from: its summary, octets and parse, each
/// present when the plan needs it.
#[derive(Clone, Copy)]
struct Source<'s> {
    sum: Option<&'s Summary>,
    raw: Option<&'s [u8]>,
    parsed: Option<&'s Parsed<'s>>,
}

impl Source<'_> {
    fn section(&self, section: Option<&Section<'_>>) -> Cow<'_, [u8]> {
        let raw = self.raw.unwrap_or_default();
        match section_need(section) {
            Need::Summary => self
                .sum
                .and_then(|s| s.header_section(section))
                .map_or(Cow::Borrowed(&[][..]), Cow::Owned),
            Need::Raw => match section {
                None => Cow::Borrowed(raw),
                _ => Cow::Borrowed(&raw[header_end(raw)..]),
            },
            _ => self
                .parsed
                .map_or(Cow::Borrowed(&[][..]), |p| Cow::Owned(p.section(section))),
        }
    }
}

/// `BODY[section]<partial>`: the label and the literal.
fn render_body_ext(
    line: &mut Vec<u8>,
    src: Source<'_>,
    section: Option<&Section<'_>>,
    partial: Option<&(u32, std::num::NonZeroU32)>,
) {
    let data = src.section(section);
    line.extend_from_slice(format!("BODY[{}]", section_label(section)).as_bytes());
    let slice: &[u8] = match partial {
        Some((start, len)) => {
            line.extend_from_slice(format!("<{start}>").as_bytes());
            let s = (*start as usize).min(data.len());
            let e = s.saturating_add(len.get() as usize).min(data.len());
            &data[s..e]
        }
        None => &data,
    };
    line.push(b' ');
    resp::literal(line, slice);
}

/// One data item of one message; false for the items we do not answer (BINARY is not
/// advertised), so that no separator is written for them.
fn render_item(
    line: &mut Vec<u8>,
    item: &MessageDataItemName<'_>,
    m: &ViewMsg,
    flags: &str,
    src: Source<'_>,
) -> bool {
    let empty: &[u8] = &[];
    let sum = |f: fn(&Summary) -> &[u8]| src.sum.map_or(empty, f);
    match item {
        MessageDataItemName::Uid => line.extend_from_slice(format!("UID {}", m.uid).as_bytes()),
        MessageDataItemName::Flags => line.extend_from_slice(format!("FLAGS {flags}").as_bytes()),
        MessageDataItemName::InternalDate => line.extend_from_slice(
            format!("INTERNALDATE {}", internal_date(m.meta.received_unix)).as_bytes(),
        ),
        MessageDataItemName::Rfc822Size => {
            let n = src.sum.map_or(m.meta.size, |s| s.size);
            line.extend_from_slice(format!("RFC822.SIZE {n}").as_bytes());
        }
        MessageDataItemName::Envelope => {
            line.extend_from_slice(b"ENVELOPE ");
            line.extend_from_slice(sum(|s| &s.envelope));
        }
        MessageDataItemName::BodyStructure => {
            line.extend_from_slice(b"BODYSTRUCTURE ");
            line.extend_from_slice(sum(|s| &s.bodystructure));
        }
        MessageDataItemName::Body => {
            line.extend_from_slice(b"BODY ");
            line.extend_from_slice(sum(|s| &s.body));
        }
        MessageDataItemName::Rfc822 => {
            line.extend_from_slice(b"RFC822 ");
            resp::literal(line, src.raw.unwrap_or_default());
        }
        MessageDataItemName::Rfc822Header => {
            line.extend_from_slice(b"RFC822.HEADER ");
            resp::literal(line, sum(|s| &s.header));
        }
        MessageDataItemName::Rfc822Text => {
            line.extend_from_slice(b"RFC822.TEXT ");
            let raw = src.raw.unwrap_or_default();
            resp::literal(line, &raw[header_end(raw)..]);
        }
        MessageDataItemName::BodyExt {
            section, partial, ..
        } => render_body_ext(line, src, section.as_ref(), partial.as_ref()),
        _ => return false,
    }
    true
}

/// `* n FETCH (...)` for one message with its `flags` as shown (`\Recent`
/// included). `flags_changed`: FETCH set `\Seen`, so FLAGS goes out even if
/// it was not asked for.
fn render_message(
    plan: &Plan<'_>,
    seq: usize,
    m: &ViewMsg,
    flags: &str,
    (sum, raw): (Option<&Summary>, Option<&[u8]>),
    flags_changed: bool,
) -> Vec<u8> {
    let parsed = raw.filter(|_| plan.needs_parse).map(message::parse);
    let src = Source {
        sum,
        raw,
        parsed: parsed.as_ref(),
    };
    let mut line = format!("* {seq} FETCH (").into_bytes();
    let mut first = true;
    for item in &plan.items {
        let mark = line.len();
        if !first {
            line.push(b' ');
        }
        if render_item(&mut line, item, m, flags, src) {
            first = false;
        } else {
            line.truncate(mark);
        }
    }
    if flags_changed && !plan.items.contains(&MessageDataItemName::Flags) {
        if !first {
            line.push(b' ');
        }
        line.extend_from_slice(format!("FLAGS {flags}").as_bytes());
    }
    line.extend_from_slice(b")\r\n");
    line
}

impl ImapCore {
    pub(super) fn fetch(
        &mut self,
        tag: &str,
        set: &SequenceSet,
        what: MacroOrMessageDataItemNames<'_>,
        uid: bool,
    ) -> Step {
        let plan = Plan::new(what, uid);
        let idxs = match self.resolve_checked(tag, set, uid) {
            Ok(i) => i,
            Err(bad) => return bad,
        };
        let mut out = Vec::new();
        let mut seen_updates = Vec::new();
        let read = self.fetch_each(&plan, &idxs, &mut out, &mut seen_updates);
        // \Seen is saved for what was sent even if a later read failed.
        let saved = match (&self.account, seen_updates.is_empty()) {
            // Only \Seen is added: other flags another session set stay.
            (Some(account), false) => self
                .shared
                .apply_flags(account, &seen_updates, FlagOp::Add(&["\\Seen".to_string()]))
                .map(|_| ()),
            _ => Ok(()),
        };
        let missing = match read.and_then(|missing| saved.map(|()| missing)) {
            Ok(missing) => missing,
            Err(e) => {
                out.extend_from_slice(&unavailable(tag, "FETCH", &e));
                return Step::Reply(out);
            }
        };
        self.sync_after(&mut out, uid);
        if missing {
            // RFC 2180 4.1.2 for what we can no longer read (RFC 5530 EXPUNGEISSUED).
            out.extend_from_slice(&tagged(
                tag,
                "NO",
                "[EXPUNGEISSUED] Some of the messages were removed meanwhile; the others were sent",
            ));
        } else {
            out.extend_from_slice(&tagged(tag, "OK", "FETCH completed"));
        }
        Step::Reply(out)
    }

    /// Render the messages at `idxs` into `out`, marking them `\Seen` in this
    /// session where the plan says so (the ids go to `seen_updates`, to be saved).
    /// A message removed elsewhere whose EXPUNGE this session has not sent yet is
    /// read from what the process kept of it (`Shared::body`); true if some such
    /// message could not be read at all (removed by another process, or long ago).
    fn fetch_each(
        &mut self,
        plan: &Plan<'_>,
        idxs: &[usize],
        out: &mut Vec<u8>,
        seen_updates: &mut Vec<u64>,
    ) -> Result<bool, QuarantineError> {
        let Some(sel) = &mut self.sel else {
            return Ok(false);
        };
        let mut missing = false;
        for &idx in idxs {
            let id = sel.msgs[idx].meta.id;
            let raw = if plan.needs_raw {
                match self.shared.body(id)? {
                    Some(b) => Some(b),
                    None => {
                        missing = true;
                        continue;
                    }
                }
            } else {
                None
            };
            let sum = match (&raw, plan.needs_summary) {
                (_, false) => None,
                (Some(raw), true) => Some(self.shared.summary_of(id, raw)),
                (None, true) => match self.shared.summary(id)? {
                    Some(s) => Some(s),
                    None => {
                        missing = true;
                        continue;
                    }
                },
            };
            let recent = sel.recent.contains(&sel.msgs[idx].uid);
            let m = &mut sel.msgs[idx];
            let mut flags_changed = false;
            if plan.marks_seen && !sel.read_only && !m.flags.iter().any(|f| f == "\\Seen") {
                m.flags.push("\\Seen".to_string());
                normalize(&mut m.flags);
                sel.synced = None;
                seen_updates.push(m.meta.id);
                flags_changed = true;
            }
            out.extend_from_slice(&render_message(
                plan,
                idx + 1,
                m,
                &msg_flags(&m.flags, recent),
                (sum.as_deref(), raw.as_deref().map(Vec::as_slice)),
                flags_changed,
            ));
        }
        Ok(missing)
    }
}
