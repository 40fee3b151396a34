//! The objects and functions scripts see: `c` (connection/transaction),
//! `m` (the message) and the verdict functions.

use std::sync::{Arc, Mutex, PoisonError};

use mail_parser::{MessageParser, MimeHeaders};
use rhai::{Array, Dynamic, Engine, EvalAltResult, FLOAT, INT, ImmutableString};

use crate::mail::{Enhanced, Reply};
use crate::policy::auth::AuthOutcome;
use crate::policy::types::{ConnInfo, ListHits, ScanResults, TxInfo, Verdict};

/// Longest body text handed to scripts (bytes); the rest is cut off.
pub(crate) const MAX_BODY_TEXT: usize = 1 << 20;
/// Most headers the scripts of one message may add.
pub(crate) const MAX_ADDED_HEADERS: usize = 32;

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// A verdict as a script value.
#[derive(Debug, Clone)]
pub(crate) struct ScriptVerdict(pub(crate) Verdict);

/// `c` in `connect(c)`, `mail_from(c)`, `rcpt(c)`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Conn {
    pub(crate) ip: ImmutableString,
    pub(crate) port: INT,
    pub(crate) tls: bool,
    pub(crate) helo: ImmutableString,
    pub(crate) from: ImmutableString,
    pub(crate) auth_user: ImmutableString,
    pub(crate) rcpt: ImmutableString,
    pub(crate) submission: bool,
}

impl Conn {
    pub(crate) fn from_conn(c: &ConnInfo) -> Self {
        Self {
            ip: c.ip.to_string().into(),
            port: INT::from(c.port),
            tls: c.tls,
            ..Self::default()
        }
    }

    pub(crate) fn from_tx(tx: &TxInfo, rcpt: Option<&str>) -> Self {
        Self {
            helo: tx.helo.as_str().into(),
            from: tx.from.as_str().into(),
            auth_user: tx.auth_user.as_deref().unwrap_or("").into(),
            rcpt: rcpt.unwrap_or("").into(),
            submission: tx.submission,
            ..Self::from_conn(&tx.conn)
        }
    }
}

/// What scripts did to a message besides returning a verdict.
#[derive(Debug, Default, Clone)]
pub(crate) struct Effects {
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) score: f64,
    pub(crate) reasons: Vec<String>,
}

/// The read-only part of `m`.
#[derive(Debug, Default)]
pub(crate) struct MsgData {
    pub(crate) from: ImmutableString,
    pub(crate) from_domain: ImmutableString,
    pub(crate) rcpt: Array,
    pub(crate) helo: ImmutableString,
    pub(crate) ip: ImmutableString,
    pub(crate) auth_user: ImmutableString,
    pub(crate) tls: bool,
    pub(crate) size: INT,
    pub(crate) subject: ImmutableString,
    /// (lowercased name, unfolded value), in message order.
    pub(crate) headers: Vec<(String, ImmutableString)>,
    pub(crate) body: ImmutableString,
    pub(crate) attachments: Array,
    /// Lowercase extension -> the first attachment name with it, built
    /// once here so a rule's cost does not grow with the attachment count
    /// (5 000 tiny parts must not push a script past `max_operations`).
    /// Scripts ask it through `m.attachment_with_ext([...])`, so no value
    /// the size of the attachment list (over the sandbox's 10 000 items
    /// it would be a script error) ever enters the script.
    pub(crate) attachment_extensions: std::collections::HashMap<String, ImmutableString>,
    pub(crate) spf: ImmutableString,
    pub(crate) dkim: ImmutableString,
    pub(crate) dmarc: ImmutableString,
    pub(crate) dmarc_policy: ImmutableString,
    pub(crate) virus: ImmutableString,
    pub(crate) rspamd_score: FLOAT,
    pub(crate) rspamd_action: ImmutableString,
    pub(crate) rspamd_symbols: Array,
    pub(crate) allowed: bool,
    pub(crate) blocked: bool,
}

/// `m` in `data(m)`. Clones share the effects, so `m.score(..)` inside a
/// script function (which gets a copy of `m`) still counts.
#[derive(Debug, Clone)]
pub(crate) struct Msg {
    pub(crate) data: Arc<MsgData>,
    pub(crate) effects: Arc<Mutex<Effects>>,
}

/// The lowercase extension of a file name, as Windows would run it:
/// trailing dots and spaces are dropped first (`invoice.exe .` is an .exe).
fn extension(name: &str) -> Option<String> {
    let name = name.trim_end_matches(|c: char| c == '.' || c.is_whitespace());
    let (stem, ext) = name.rsplit_once('.')?;
    (!stem.is_empty() || !ext.is_empty()).then(|| ext.trim().to_lowercase())
}

fn unfold(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        if c != '\r' && c != '\n' {
            out.push(c);
        }
    }
    out.trim().to_string()
}

impl Msg {
    /// Parses `message` (mail-parser) and gathers what scripts may read.
    pub(crate) fn build(
        tx: &TxInfo,
        message: &[u8],
        auth: &AuthOutcome,
        scan: &ScanResults,
        lists: ListHits,
    ) -> Self {
        let from_domain = tx
            .from
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        let mut data = MsgData {
            from: tx.from.as_str().into(),
            from_domain: from_domain.into(),
            rcpt: tx.rcpts.iter().map(|r| Dynamic::from(r.clone())).collect(),
            helo: tx.helo.as_str().into(),
            ip: tx.conn.ip.to_string().into(),
            auth_user: tx.auth_user.as_deref().unwrap_or("").into(),
            tls: tx.conn.tls,
            size: INT::try_from(message.len()).unwrap_or(INT::MAX),
            spf: auth.spf.into(),
            dkim: auth.dkim.into(),
            dmarc: auth.dmarc.into(),
            dmarc_policy: auth.dmarc_policy.into(),
            virus: scan.virus.as_str().into(),
            rspamd_score: scan.rspamd_score,
            rspamd_action: scan.rspamd_action.as_str().into(),
            rspamd_symbols: scan
                .rspamd_symbols
                .iter()
                .map(|s| Dynamic::from(ImmutableString::from(s.as_str())))
                .collect(),
            allowed: lists.allowed,
            blocked: lists.blocked,
            ..MsgData::default()
        };
        if let Some(parsed) = MessageParser::default().parse(message) {
            data.subject = parsed.subject().unwrap_or("").into();
            data.headers = parsed
                .headers_raw()
                .map(|(name, value)| (name.to_ascii_lowercase(), unfold(value).into()))
                .collect();
            if let Some(text) = parsed.body_text(0) {
                let mut end = text.len().min(MAX_BODY_TEXT);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                data.body = text[..end].into();
            }
            data.attachments = parsed
                .attachments()
                .filter_map(|p| p.attachment_name())
                .map(|n| Dynamic::from(n.to_string()))
                .collect();
            for name in parsed.attachments().filter_map(|p| p.attachment_name()) {
                if let Some(ext) = extension(name) {
                    data.attachment_extensions
                        .entry(ext)
                        .or_insert_with(|| name.into());
                }
            }
        }
        Self {
            data: Arc::new(data),
            effects: Arc::new(Mutex::new(Effects::default())),
        }
    }

    /// An attachment name whose extension is one of `exts` (any case; the
    /// first of `exts` that has one, its first such name), or `""`.
    fn attachment_with_ext(&self, exts: &Array) -> ImmutableString {
        let map = &self.data.attachment_extensions;
        if map.is_empty() {
            return ImmutableString::new();
        }
        exts.iter()
            .filter_map(|e| e.clone().into_immutable_string().ok())
            .find_map(|e| map.get(e.to_lowercase().as_str()).cloned())
            .unwrap_or_default()
    }

    /// The same message with effects of its own (for a shadow script).
    pub(crate) fn detached(&self) -> Self {
        Self {
            data: self.data.clone(),
            effects: Arc::new(Mutex::new(Effects::default())),
        }
    }

    /// Where the effects stand now: (score, headers added so far).
    pub(crate) fn effects_mark(&self) -> (f64, usize) {
        let fx = self.effects.lock().unwrap_or_else(PoisonError::into_inner);
        (fx.score, fx.headers.len())
    }

    /// The score and headers added since `mark`.
    pub(crate) fn effects_since(&self, mark: (f64, usize)) -> (f64, Vec<String>) {
        let fx = self.effects.lock().unwrap_or_else(PoisonError::into_inner);
        let headers = fx.headers[mark.1.min(fx.headers.len())..]
            .iter()
            .map(|(n, v)| format!("{n}: {v}"))
            .collect();
        (fx.score - mark.0, headers)
    }

    pub(crate) fn effects(&self) -> Effects {
        self.effects
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn header(&self, name: &str) -> ImmutableString {
        let name = name.to_ascii_lowercase();
        self.data
            .headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    fn headers(&self, name: &str) -> Array {
        let name = name.to_ascii_lowercase();
        self.data
            .headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| Dynamic::from(v.clone()))
            .collect()
    }

    fn add_header(&self, name: &str, value: &str) -> RhaiResult<()> {
        let name_ok = !name.is_empty()
            && name.len() <= 76
            && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !name_ok {
            return Err(format!("add_header: bad header name {name:?}").into());
        }
        if value.contains(['\r', '\n', '\0']) || value.len() > 900 {
            return Err(format!(
                "add_header: the value of {name} must be one line of at most 900 bytes"
            )
            .into());
        }
        let mut fx = self.effects.lock().unwrap_or_else(PoisonError::into_inner);
        if fx.headers.len() >= MAX_ADDED_HEADERS {
            return Err(format!("add_header: more than {MAX_ADDED_HEADERS} headers").into());
        }
        fx.headers.push((name.to_string(), value.to_string()));
        Ok(())
    }

    fn score(&self, points: FLOAT, why: &str) -> RhaiResult<()> {
        if !points.is_finite() {
            return Err("score: points must be a finite number".into());
        }
        let mut fx = self.effects.lock().unwrap_or_else(PoisonError::into_inner);
        fx.score += points;
        if fx.reasons.len() < 64 {
            fx.reasons.push(format!("{why} ({points:+})"));
        }
        Ok(())
    }
}

/// The reply of a script's `reject()`/`tempfail()`: a leading enhanced
/// code (`"5.7.1 go away"`) is kept apart from the text; without one,
/// `default` is supplied. The text is made one safe line.
pub(crate) fn script_reply(code: u16, text: &str, default: Enhanced) -> Reply {
    let clean = text.trim();
    let first = clean.split_whitespace().next().unwrap_or("");
    let mut r = if Enhanced::parse(first).is_some() {
        Reply::parse_text(code, clean)
    } else {
        Reply::new(code, default, clean)
    };
    // A control character at the end became a space.
    r.text.truncate(r.text.trim_end().len());
    r
}

fn sanitize_reason(reason: &str) -> String {
    crate::mail::one_line(reason).trim().to_string()
}

/// Registers `c`, `m` and the verdict functions on `engine`.
pub(crate) fn register(engine: &mut Engine) {
    engine.register_type_with_name::<ScriptVerdict>("Verdict");
    engine.register_fn("accept", || ScriptVerdict(Verdict::Accept));
    engine.register_fn("discard", || ScriptVerdict(Verdict::Discard));
    engine.register_fn(
        "reject",
        |code: INT, text: &str| -> RhaiResult<ScriptVerdict> {
            if !(500..=599).contains(&code) {
                return Err(format!("reject() needs a 5xx code, not {code}").into());
            }
            let code = u16::try_from(code).unwrap_or(550);
            Ok(ScriptVerdict(Verdict::Reject(script_reply(
                code,
                text,
                Enhanced::new(5, 7, 1),
            ))))
        },
    );
    engine.register_fn("tempfail", |text: &str| {
        ScriptVerdict(Verdict::Tempfail(script_reply(
            451,
            text,
            Enhanced::new(4, 7, 1),
        )))
    });
    engine.register_fn("quarantine", |reason: &str| {
        ScriptVerdict(Verdict::Quarantine {
            reason: sanitize_reason(reason),
        })
    });

    engine.register_type_with_name::<Conn>("Connection");
    engine.register_get("ip", |c: &mut Conn| c.ip.clone());
    engine.register_get("port", |c: &mut Conn| c.port);
    engine.register_get("tls", |c: &mut Conn| c.tls);
    engine.register_get("helo", |c: &mut Conn| c.helo.clone());
    engine.register_get("from", |c: &mut Conn| c.from.clone());
    engine.register_get("auth_user", |c: &mut Conn| c.auth_user.clone());
    engine.register_get("rcpt", |c: &mut Conn| c.rcpt.clone());
    engine.register_get("submission", |c: &mut Conn| c.submission);

    engine.register_type_with_name::<Msg>("Message");
    engine.register_get("from", |m: &mut Msg| m.data.from.clone());
    engine.register_get("from_domain", |m: &mut Msg| m.data.from_domain.clone());
    engine.register_get("rcpt", |m: &mut Msg| m.data.rcpt.clone());
    engine.register_get("helo", |m: &mut Msg| m.data.helo.clone());
    engine.register_get("ip", |m: &mut Msg| m.data.ip.clone());
    engine.register_get("auth_user", |m: &mut Msg| m.data.auth_user.clone());
    engine.register_get("tls", |m: &mut Msg| m.data.tls);
    engine.register_get("size", |m: &mut Msg| m.data.size);
    engine.register_get("subject", |m: &mut Msg| m.data.subject.clone());
    engine.register_get("body", |m: &mut Msg| m.data.body.clone());
    engine.register_get("attachments", |m: &mut Msg| m.data.attachments.clone());
    engine.register_fn("attachment_with_ext", |m: &mut Msg, exts: Array| {
        m.attachment_with_ext(&exts)
    });
    engine.register_get("spf", |m: &mut Msg| m.data.spf.clone());
    engine.register_get("dkim", |m: &mut Msg| m.data.dkim.clone());
    engine.register_get("dmarc", |m: &mut Msg| m.data.dmarc.clone());
    engine.register_get("dmarc_policy", |m: &mut Msg| m.data.dmarc_policy.clone());
    engine.register_get("virus", |m: &mut Msg| m.data.virus.clone());
    engine.register_get("rspamd_score", |m: &mut Msg| m.data.rspamd_score);
    engine.register_get("rspamd_action", |m: &mut Msg| m.data.rspamd_action.clone());
    engine.register_get("rspamd_symbols", |m: &mut Msg| {
        m.data.rspamd_symbols.clone()
    });
    engine.register_get("allowed", |m: &mut Msg| m.data.allowed);
    engine.register_get("blocked", |m: &mut Msg| m.data.blocked);
    engine.register_fn("header", |m: &mut Msg, name: &str| m.header(name));
    engine.register_fn("headers", |m: &mut Msg, name: &str| m.headers(name));
    engine.register_fn("add_header", |m: &mut Msg, name: &str, value: &str| {
        m.add_header(name, value)
    });
    engine.register_fn("score", |m: &mut Msg, points: FLOAT, why: &str| {
        m.score(points, why)
    });
    engine.register_fn("score", |m: &mut Msg, points: INT, why: &str| {
        // Precision loss above 2^53 points does not matter.
        #[allow(clippy::cast_precision_loss)]
        m.score(points as FLOAT, why)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the old text-only form showed: enhanced code, then the text.
    fn reply_text(text: &str, default: Enhanced) -> String {
        let r = script_reply(550, text, default);
        match r.enhanced {
            Some(e) if r.text.is_empty() => e.to_string(),
            Some(e) => format!("{e} {}", r.text),
            None => r.text,
        }
    }

    #[test]
    fn extensions_as_windows_sees_them() {
        assert_eq!(extension("Invoice.PDF.EXE").as_deref(), Some("exe"));
        assert_eq!(extension("invoice.exe. . ").as_deref(), Some("exe"));
        assert_eq!(extension(".bashrc").as_deref(), Some("bashrc"));
        assert_eq!(extension("README"), None);
    }

    #[test]
    fn reply_texts() {
        let (e571, e471) = (Enhanced::new(5, 7, 1), Enhanced::new(4, 7, 1));
        assert_eq!(reply_text("5.7.1 go away", e571), "5.7.1 go away");
        assert_eq!(reply_text("go away", e571), "5.7.1 go away");
        assert_eq!(reply_text("a\r\n250 OK", e471), "4.7.1 a  250 OK");
        assert_eq!(reply_text("", e471), "4.7.1");
    }
}
