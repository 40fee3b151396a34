//! FETCH and UID FETCH (RFC 3501 6.4.5): the data items of each message, read from the
//! store only when an item needs the message itself. A non-PEEK body item sets `\Seen`.

use imap_codec::imap_types::core::{AString, Vec1};
use imap_codec::imap_types::fetch::{
    Macro, MacroOrMessageDataItemNames, MessageDataItemName, Part, Section,
};
use imap_codec::imap_types::sequence::SequenceSet;

use super::core::{ImapCore, Step, tagged, unavailable};
use crate::mailbox::imap::message::{self, Parsed};
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

/// What a FETCH asks of each message, decided once for the command.
struct Plan<'a> {
    items: Vec<MessageDataItemName<'a>>,
    /// Some item needs the message itself (not just the view).
    needs_body: bool,
    /// Some item reads the body without PEEK, which sets `\Seen`.
    marks_seen: bool,
}

impl<'a> Plan<'a> {
    fn new(what: MacroOrMessageDataItemNames<'a>, uid: bool) -> Plan<'a> {
        let items = expand_items(what, uid);
        let needs_body = items.iter().any(|i| {
            !matches!(
                i,
                MessageDataItemName::Uid
                    | MessageDataItemName::Flags
                    | MessageDataItemName::InternalDate
            )
        });
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
            needs_body,
            marks_seen,
        }
    }
}

/// `BODY[section]<partial>`: the label and the literal.
fn render_body_ext(
    line: &mut Vec<u8>,
    parsed: Option<&Parsed<'_>>,
    section: Option<&Section<'_>>,
    partial: Option<&(u32, std::num::NonZeroU32)>,
) {
    let data = parsed.map(|p| p.section(section)).unwrap_or_default();
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
    raw: Option<&[u8]>,
    parsed: Option<&Parsed<'_>>,
) -> bool {
    let empty: &[u8] = &[];
    match item {
        MessageDataItemName::Uid => line.extend_from_slice(format!("UID {}", m.uid).as_bytes()),
        MessageDataItemName::Flags => line.extend_from_slice(format!("FLAGS {flags}").as_bytes()),
        MessageDataItemName::InternalDate => line.extend_from_slice(
            format!("INTERNALDATE {}", internal_date(m.meta.received_unix)).as_bytes(),
        ),
        MessageDataItemName::Rfc822Size => {
            let n = raw.map_or(m.meta.size, |r| r.len() as u64);
            line.extend_from_slice(format!("RFC822.SIZE {n}").as_bytes());
        }
        MessageDataItemName::Envelope => {
            line.extend_from_slice(b"ENVELOPE ");
            line.extend_from_slice(&parsed.map(|p| p.envelope()).unwrap_or_default());
        }
        MessageDataItemName::BodyStructure | MessageDataItemName::Body => {
            let ext = matches!(item, MessageDataItemName::BodyStructure);
            line.extend_from_slice(if ext { b"BODYSTRUCTURE " } else { b"BODY " });
            line.extend_from_slice(&parsed.map(|p| p.structure(ext)).unwrap_or_default());
        }
        MessageDataItemName::Rfc822 => {
            line.extend_from_slice(b"RFC822 ");
            resp::literal(line, parsed.map_or(empty, |p| p.raw()));
        }
        MessageDataItemName::Rfc822Header => {
            line.extend_from_slice(b"RFC822.HEADER ");
            resp::literal(line, parsed.map_or(empty, |p| p.header()));
        }
        MessageDataItemName::Rfc822Text => {
            line.extend_from_slice(b"RFC822.TEXT ");
            resp::literal(line, parsed.map_or(empty, |p| p.text()));
        }
        MessageDataItemName::BodyExt {
            section, partial, ..
        } => render_body_ext(line, parsed, section.as_ref(), partial.as_ref()),
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
    raw: Option<&[u8]>,
    flags_changed: bool,
) -> Vec<u8> {
    let parsed = raw.map(message::parse);
    let mut line = format!("* {seq} FETCH (").into_bytes();
    let mut first = true;
    for item in &plan.items {
        let mark = line.len();
        if !first {
            line.push(b' ');
        }
        if render_item(&mut line, item, m, flags, raw, parsed.as_ref()) {
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
            let raw = if plan.needs_body {
                match self.shared.body(sel.msgs[idx].meta.id)? {
                    Some(b) => Some(b),
                    None => {
                        missing = true;
                        continue;
                    }
                }
            } else {
                None
            };
            let recent = sel.recent.contains(&sel.msgs[idx].uid);
            let m = &mut sel.msgs[idx];
            let mut flags_changed = false;
            if plan.marks_seen && !sel.read_only && !m.flags.iter().any(|f| f == "\\Seen") {
                m.flags.push("\\Seen".to_string());
                normalize(&mut m.flags);
                seen_updates.push(m.meta.id);
                flags_changed = true;
            }
            out.extend_from_slice(&render_message(
                plan,
                idx + 1,
                m,
                &msg_flags(&m.flags, recent),
                raw.as_deref().map(Vec::as_slice),
                flags_changed,
            ));
        }
        Ok(missing)
    }
}
