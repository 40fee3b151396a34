//! SEARCH and UID SEARCH (RFC 3501 6.4.4). Keys on flags, dates and sizes need only the
//! view; header, date and text keys look at the message's [`Summary`] (its searched
//! headers and text kept lower-cased, computed once per held message), so a search over a
//! folder parses only the messages no one has looked at yet.

use imap_codec::imap_types::core::{AString, Vec1};
use imap_codec::imap_types::search::SearchKey;

use super::core::{ImapCore, Step, astring_text, set_contains, tagged, unavailable};
use crate::mailbox::imap::message::{self, Summary};
use crate::mailbox::imap::state::ViewMsg;

fn needs_body(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().any(needs_body),
        SearchKey::Not(k) => needs_body(k),
        SearchKey::Or(a, b) => needs_body(a) || needs_body(b),
        SearchKey::Bcc(_)
        | SearchKey::Body(_)
        | SearchKey::Cc(_)
        | SearchKey::From(_)
        | SearchKey::Header(..)
        | SearchKey::SentBefore(_)
        | SearchKey::SentOn(_)
        | SearchKey::SentSince(_)
        | SearchKey::Subject(_)
        | SearchKey::Text(_)
        | SearchKey::To(_) => true,
        _ => false,
    }
}

/// `hay_lc` (already lower-cased) contains `needle`, compared case-insensitively.
fn contains_ci(hay_lc: &str, needle: &AString<'_>) -> bool {
    hay_lc.contains(&astring_text(needle).to_lowercase())
}

/// One message as the search keys see it.
struct SearchCtx<'a> {
    seq: u32,
    max_seq: u32,
    max_uid: u32,
    msg: &'a ViewMsg,
    /// `\Recent` in this session.
    recent: bool,
    sum: Option<&'a Summary>,
}

impl<'a> SearchCtx<'a> {
    fn has(&self, flag: &str) -> bool {
        self.msg.flags.iter().any(|x| x.eq_ignore_ascii_case(flag))
    }

    /// The header's text, lower-cased.
    fn header(&self, name: &str) -> std::borrow::Cow<'a, str> {
        self.sum
            .map_or(std::borrow::Cow::Borrowed(""), |s| s.header_text_lc(name))
    }

    fn internal(&self) -> chrono::NaiveDate {
        chrono::DateTime::from_timestamp(self.msg.meta.received_unix, 0)
            .unwrap_or_default()
            .date_naive()
    }

    fn sent(&self) -> Option<chrono::NaiveDate> {
        self.sum.and_then(|s| s.sent)
    }
}

/// Keys on flags, sets, dates and sizes; `None` for the keys that look into the message.
fn eval_meta(key: &SearchKey<'_>, c: &SearchCtx<'_>) -> Option<bool> {
    Some(match key {
        SearchKey::SequenceSet(set) => set_contains(set, c.seq, c.max_seq),
        SearchKey::Uid(set) => set_contains(set, c.msg.uid, c.max_uid),
        SearchKey::All => true,
        SearchKey::Answered => c.has("\\Answered"),
        SearchKey::Unanswered => !c.has("\\Answered"),
        SearchKey::Deleted => c.has("\\Deleted"),
        SearchKey::Undeleted => !c.has("\\Deleted"),
        SearchKey::Draft => c.has("\\Draft"),
        SearchKey::Undraft => !c.has("\\Draft"),
        SearchKey::Flagged => c.has("\\Flagged"),
        SearchKey::Unflagged => !c.has("\\Flagged"),
        SearchKey::Seen => c.has("\\Seen"),
        SearchKey::Unseen => !c.has("\\Seen"),
        SearchKey::Keyword(k) => c.has(k.as_ref()),
        SearchKey::Unkeyword(k) => !c.has(k.as_ref()),
        SearchKey::Recent => c.recent,
        SearchKey::New => c.recent && !c.has("\\Seen"),
        SearchKey::Old => !c.recent,
        SearchKey::Before(d) => c.internal() < *d.as_ref(),
        SearchKey::On(d) => c.internal() == *d.as_ref(),
        SearchKey::Since(d) => c.internal() >= *d.as_ref(),
        SearchKey::Larger(n) => c.msg.meta.size > u64::from(*n),
        SearchKey::Smaller(n) => c.msg.meta.size < u64::from(*n),
        _ => return None,
    })
}

/// Keys that look into the message (headers, sent date, text).
fn eval_content(key: &SearchKey<'_>, c: &SearchCtx<'_>) -> bool {
    match key {
        SearchKey::SentBefore(d) => c.sent().is_some_and(|s| s < *d.as_ref()),
        SearchKey::SentOn(d) => c.sent().is_some_and(|s| s == *d.as_ref()),
        SearchKey::SentSince(d) => c.sent().is_some_and(|s| s >= *d.as_ref()),
        SearchKey::From(s) => contains_ci(&c.header("From"), s),
        SearchKey::To(s) => contains_ci(&c.header("To"), s),
        SearchKey::Cc(s) => contains_ci(&c.header("Cc"), s),
        SearchKey::Bcc(s) => contains_ci(&c.header("Bcc"), s),
        SearchKey::Subject(s) => contains_ci(&c.header("Subject"), s),
        SearchKey::Header(name, value) => {
            let h = c.header(&astring_text(name));
            let raw = c.sum.map(|s| s.header.as_slice()).unwrap_or_default();
            let present = !message::header_fields(raw, &[name.as_ref()], false)
                .trim_ascii()
                .is_empty();
            present && contains_ci(&h, value)
        }
        SearchKey::Body(s) => c.sum.is_some_and(|m| contains_ci(&m.body_text_lc, s)),
        SearchKey::Text(s) => c
            .sum
            .is_some_and(|m| contains_ci(&m.header_lc, s) || contains_ci(&m.body_text_lc, s)),
        _ => false,
    }
}

fn eval(key: &SearchKey<'_>, c: &SearchCtx<'_>) -> bool {
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().all(|k| eval(k, c)),
        SearchKey::Not(k) => !eval(k, c),
        SearchKey::Or(a, b) => eval(a, c) || eval(b, c),
        _ => eval_meta(key, c).unwrap_or_else(|| eval_content(key, c)),
    }
}

impl ImapCore {
    pub(super) fn search_cmd(
        &mut self,
        tag: &str,
        charset: Option<&str>,
        criteria: Vec1<SearchKey<'_>>,
        uid: bool,
    ) -> Step {
        if let Some(cs) = charset
            && !["US-ASCII", "UTF-8"]
                .iter()
                .any(|c| c.eq_ignore_ascii_case(cs))
        {
            return Step::Reply(tagged(
                tag,
                "NO",
                "[BADCHARSET (US-ASCII UTF-8)] Unsupported charset",
            ));
        }
        self.search(tag, &SearchKey::And(criteria), uid)
    }

    fn search(&mut self, tag: &str, key: &SearchKey<'_>, uid: bool) -> Step {
        let Some(sel) = &self.sel else {
            return Step::Reply(tagged(tag, "NO", "Select a mailbox first"));
        };
        let body = needs_body(key);
        let max_seq = sel.msgs.len() as u32;
        let max_uid = sel.msgs.last().map_or(0, |m| m.uid);
        let mut hits = Vec::new();
        let mut missing = false;
        for (i, m) in sel.msgs.iter().enumerate() {
            // A message removed elsewhere is searched as FETCH reads it (`Shared::body`);
            // one that can no longer be read matches no content key, and the NO says so.
            let sum = if body {
                match self.shared.summary(m.meta.id) {
                    Ok(s) => {
                        missing |= s.is_none();
                        s
                    }
                    Err(e) => return Step::Reply(unavailable(tag, "SEARCH", &e)),
                }
            } else {
                None
            };
            let c = SearchCtx {
                seq: i as u32 + 1,
                max_seq,
                max_uid,
                msg: m,
                recent: sel.recent.contains(&m.uid),
                sum: sum.as_deref(),
            };
            if eval(key, &c) {
                hits.push(if uid { m.uid } else { i as u32 + 1 });
            }
        }
        let mut out = b"* SEARCH".to_vec();
        for h in hits {
            out.extend_from_slice(format!(" {h}").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        self.sync_after(&mut out, uid);
        if missing {
            out.extend_from_slice(&tagged(
                tag,
                "NO",
                "[EXPUNGEISSUED] Some messages were removed meanwhile and could not be searched",
            ));
        } else {
            out.extend_from_slice(&tagged(tag, "OK", "SEARCH completed"));
        }
        Step::Reply(out)
    }
}
