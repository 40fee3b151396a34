//! SPF, DKIM and DMARC with mail-auth over a hickory resolver, under one
//! deadline; the `Authentication-Results` header (RFC 8601); and removal of
//! forged ones.

use std::borrow::Cow;
use std::net::IpAddr;

use mail_auth::dmarc::Policy as DmarcPolicy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, DkimOutput, DkimResult, DmarcOutput, DmarcResult, MessageAuthenticator,
    SpfOutput, SpfResult,
};
use tokio::time::{Instant, timeout_at};

use crate::config::ChecksConfig;

/// The outcome of the checks on one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthOutcome {
    pub(crate) spf: &'static str,
    pub(crate) dkim: &'static str,
    pub(crate) dmarc: &'static str,
    /// The DMARC policy of the From domain: `reject`, `quarantine`, `none`
    /// (also when there is no record).
    pub(crate) dmarc_policy: &'static str,
    /// The value of the `Authentication-Results` header (after the name).
    pub(crate) header: String,
}

/// The words a check result may be given as (suite cases, replays).
pub(crate) const RESULT_WORDS: [&str; 10] = [
    "pass",
    "fail",
    "softfail",
    "neutral",
    "none",
    "temperror",
    "permerror",
    "policy",
    "reject",
    "quarantine",
];

/// `word` as one of [`RESULT_WORDS`], `none` when it is not one.
pub(crate) fn result_word(word: &str) -> &'static str {
    let w = word.trim().to_ascii_lowercase();
    RESULT_WORDS
        .iter()
        .find(|r| **r == w)
        .copied()
        .unwrap_or("none")
}

impl AuthOutcome {
    /// Results given in advance, with the header they would have made.
    pub(crate) fn fixed(hostname: &str, c: &crate::policy::CheckResults) -> Self {
        let (spf, dkim, dmarc) = (
            result_word(&c.spf),
            result_word(&c.dkim),
            result_word(&c.dmarc),
        );
        AuthOutcome {
            spf,
            dkim,
            dmarc,
            dmarc_policy: result_word(&c.dmarc_policy),
            header: format!("{hostname}; spf={spf}; dkim={dkim}; dmarc={dmarc}"),
        }
    }
}

fn spf_word(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dkim_word(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        // mail-auth says neutral for a body changed in transit; RFC 6376
        // 3.7 calls that PERMFAIL, which RFC 8601 reports as "fail".
        DkimResult::Neutral(mail_auth::Error::Dkim(
            mail_auth::dkim::DkimError::FailedBodyHashMatch,
        )) => "fail",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

fn dmarc_word(r: &DmarcResult) -> &'static str {
    match r {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}

/// A pvalue (RFC 8601): a token as is, anything else quoted.
fn pvalue(s: &str) -> Cow<'_, str> {
    // token (RFC 2045) or local-part@domain: printable, no tspecials but '@'.
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>,;:\\\"/[]?=".contains(&b));
    if plain {
        Cow::Borrowed(s)
    } else {
        let mut q = String::with_capacity(s.len() + 2);
        q.push('"');
        for c in s.chars().filter(|c| !c.is_control()) {
            if c == '"' || c == '\\' {
                q.push('\\');
            }
            q.push(c);
        }
        q.push('"');
        Cow::Owned(q)
    }
}

fn helo_is_domain(helo: &str) -> bool {
    !helo.is_empty()
        && !helo.starts_with('[')
        && helo.parse::<IpAddr>().is_err()
        && helo.contains('.')
}

/// Who is sending, as the checks and the header need it.
struct Sender<'a> {
    hostname: &'a str,
    ip: IpAddr,
    /// Trimmed.
    helo: &'a str,
    mail_from: &'a str,
    /// The MAIL FROM domain, or the HELO name for bounces, lowercased.
    mail_from_domain: String,
}

/// The DMARC part of an outcome: result word (None when not checked),
/// policy, and the From domain it was evaluated for.
struct DmarcSummary {
    word: Option<&'static str>,
    policy: &'static str,
    domain: String,
}

/// Runs the enabled checks. Never takes longer than `checks.deadline`
/// (plus scheduling): what is unfinished then is `temperror`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn check_message(
    resolver: &MessageAuthenticator,
    checks: &ChecksConfig,
    hostname: &str,
    ip: IpAddr,
    helo: &str,
    mail_from: &str,
    message: &[u8],
) -> AuthOutcome {
    let deadline = Instant::now() + checks.deadline.0;
    let helo = helo.trim();
    let sender = Sender {
        hostname,
        ip,
        helo,
        mail_from,
        mail_from_domain: mail_from
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_else(|| helo.to_ascii_lowercase()),
    };
    let parsed = AuthenticatedMessage::parse(message);

    let (spf, dkim) = tokio::join!(
        verify_spf(resolver, checks, &sender, deadline),
        verify_dkim(resolver, checks, parsed.as_ref(), deadline)
    );
    let spf_result = spf.as_ref().map(|s| s.result());
    let dkim_outputs = dkim.unwrap_or_default();
    let dkim_result = dkim_summary(checks, parsed.is_some(), &dkim_outputs);

    let dmarc_out = match parsed.as_ref() {
        Some(msg) if checks.dmarc => Some(
            verify_dmarc(
                resolver,
                &sender,
                msg,
                spf.as_ref(),
                &dkim_outputs,
                deadline,
            )
            .await,
        ),
        _ => None,
    };
    let dmarc = dmarc_summary(checks, dmarc_out.as_ref());

    let header = results_header(&sender, spf_result, dkim_result, &dkim_outputs, &dmarc);
    AuthOutcome {
        spf: spf_result.map_or("none", spf_word),
        dkim: dkim_result.unwrap_or("none"),
        dmarc: dmarc.word.unwrap_or("none"),
        dmarc_policy: dmarc.policy,
        header,
    }
}

/// SPF on the MAIL FROM identity, or the HELO identity for bounces; None
/// when SPF is off. A bounce with a HELO that is no domain gets `none`.
async fn verify_spf(
    resolver: &MessageAuthenticator,
    checks: &ChecksConfig,
    sender: &Sender<'_>,
    deadline: Instant,
) -> Option<SpfOutput> {
    if !checks.spf {
        return None;
    }
    let (ip, helo, hostname) = (sender.ip, sender.helo, sender.hostname);
    let out = if sender.mail_from.is_empty() {
        if !helo_is_domain(helo) {
            return Some(SpfOutput::new(sender.mail_from_domain.clone()));
        }
        let params = SpfParameters::verify_ehlo(ip, helo, hostname);
        timeout_at(deadline, resolver.verify_spf(params)).await
    } else {
        let params = SpfParameters::verify_mail_from(ip, helo, hostname, sender.mail_from);
        timeout_at(deadline, resolver.verify_spf(params)).await
    };
    Some(out.unwrap_or_else(|_| {
        SpfOutput::new(sender.mail_from_domain.clone()).with_result(SpfResult::TempError)
    }))
}

/// The DKIM signatures' outputs, also when only DMARC needs them; None
/// when neither is on or the message does not parse.
async fn verify_dkim<'m>(
    resolver: &MessageAuthenticator,
    checks: &ChecksConfig,
    parsed: Option<&'m AuthenticatedMessage<'m>>,
    deadline: Instant,
) -> Option<Vec<DkimOutput<'m>>> {
    if !(checks.dkim || checks.dmarc) {
        return None;
    }
    let msg = parsed?;
    Some(
        timeout_at(deadline, resolver.verify_dkim(msg))
            .await
            .unwrap_or_else(|_| {
                vec![DkimOutput::temp_err(mail_auth::Error::Dns(
                    mail_auth::DnsError::Resolver("deadline exceeded".into()),
                ))]
            }),
    )
}

/// One DKIM word for the message: `pass` if any signature passed, else
/// the first signature's result; None when DKIM is off.
fn dkim_summary(
    checks: &ChecksConfig,
    parsed: bool,
    outputs: &[DkimOutput<'_>],
) -> Option<&'static str> {
    if !checks.dkim {
        None
    } else if !parsed {
        Some("permerror")
    } else if outputs.iter().any(|d| d.result() == &DkimResult::Pass) {
        Some("pass")
    } else {
        Some(outputs.first().map_or("none", |d| dkim_word(d.result())))
    }
}

/// DMARC for a parsed message; `Err` when the deadline passed.
async fn verify_dmarc(
    resolver: &MessageAuthenticator,
    sender: &Sender<'_>,
    msg: &AuthenticatedMessage<'_>,
    spf: Option<&SpfOutput>,
    dkim_outputs: &[DkimOutput<'_>],
    deadline: Instant,
) -> Result<DmarcOutput, ()> {
    let spf_for_dmarc = spf.cloned().unwrap_or_else(|| {
        // SPF disabled: DMARC can still align on DKIM.
        SpfOutput::new(sender.mail_from_domain.clone())
    });
    let params = DmarcParameters::new(msg, dkim_outputs, &sender.mail_from_domain, &spf_for_dmarc);
    timeout_at(deadline, resolver.verify_dmarc(params))
        .await
        .map_err(|_| ())
}

/// Word, policy and domain of a DMARC run (`out` None: not run, which is
/// `permerror` when DMARC is on because the message did not parse).
fn dmarc_summary(checks: &ChecksConfig, out: Option<&Result<DmarcOutput, ()>>) -> DmarcSummary {
    let (word, policy, domain) = match out {
        None if checks.dmarc => (Some("permerror"), "none", String::new()),
        None => (None, "none", String::new()),
        Some(Err(())) => (Some("temperror"), "none", String::new()),
        Some(Ok(out)) => {
            let policy = match out.dmarc_record() {
                None => "none",
                Some(_) => match out.policy() {
                    DmarcPolicy::Reject => "reject",
                    DmarcPolicy::Quarantine => "quarantine",
                    DmarcPolicy::None | DmarcPolicy::Unspecified => "none",
                },
            };
            (
                Some(dmarc_word(&out.result())),
                policy,
                out.domain().to_string(),
            )
        }
    };
    DmarcSummary {
        word,
        policy,
        domain,
    }
}

/// The Authentication-Results value: authserv-id, then one resinfo per
/// check that ran (`none` when none did).
fn results_header(
    sender: &Sender<'_>,
    spf_result: Option<SpfResult>,
    dkim_result: Option<&'static str>,
    dkim_outputs: &[DkimOutput<'_>],
    dmarc: &DmarcSummary,
) -> String {
    let mut header = String::from(sender.hostname);
    if let Some(r) = spf_result {
        header.push_str("; spf=");
        header.push_str(spf_word(r));
        if sender.mail_from.is_empty() {
            if !sender.helo.is_empty() {
                header.push_str(" smtp.helo=");
                header.push_str(&pvalue(sender.helo));
            }
        } else {
            header.push_str(" smtp.mailfrom=");
            header.push_str(&pvalue(sender.mail_from));
        }
    }
    if let Some(word) = dkim_result {
        header.push_str("; dkim=");
        header.push_str(word);
        let shown = dkim_outputs
            .iter()
            .find(|d| d.result() == &DkimResult::Pass)
            .or_else(|| dkim_outputs.first());
        if let Some(sig) = shown.and_then(|d| d.signature()) {
            header.push_str(" header.d=");
            header.push_str(&pvalue(&sig.d));
            header.push_str(" header.s=");
            header.push_str(&pvalue(&sig.s));
        }
    }
    if let Some(word) = dmarc.word {
        header.push_str("; dmarc=");
        header.push_str(word);
        if !dmarc.domain.is_empty() {
            header.push_str(" header.from=");
            header.push_str(&pvalue(&dmarc.domain));
        }
        header.push_str(" policy.dmarc=");
        header.push_str(dmarc.policy);
    }
    if spf_result.is_none() && dkim_result.is_none() && dmarc.word.is_none() {
        header.push_str("; none");
    }
    header
}

/// The authserv-id of an `Authentication-Results` value: its first token
/// or quoted string (RFC 8601 2.2: `authserv-id = value`), comments
/// (CFWS, nested, with quoted pairs) and folding skipped.
pub(crate) fn authserv_id(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let mut out = String::new();
    let mut depth = 0usize;
    let mut quoted = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if depth > 0 || quoted => {
                if let Some(next) = chars.next()
                    && quoted
                {
                    out.push(next);
                }
            }
            // A quote opens a quoted-string only where the value starts; in
            // the middle of a token it ends it (`mx.test"; ...` names mx.test,
            // as a lenient reader would take it: found by fuzz/ message_rules).
            '"' if depth == 0 => {
                if quoted || !out.is_empty() {
                    break;
                }
                quoted = true;
            }
            _ if quoted => out.push(c),
            '(' => depth += 1,
            ')' if depth > 0 => depth -= 1,
            _ if depth > 0 => {}
            ';' => break,
            c if c.is_whitespace() => {
                if !out.is_empty() {
                    break;
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Two host names compared as DNS does: ASCII case-insensitive, a
/// trailing dot (the root) ignored.
fn same_host(a: &str, b: &str) -> bool {
    let a = a.strip_suffix('.').unwrap_or(a);
    let b = b.strip_suffix('.').unwrap_or(b);
    !a.is_empty() && a.eq_ignore_ascii_case(b)
}

/// Removes `Authentication-Results` header fields whose authserv-id is one
/// of `ours` (our hostname and `[checks] authserv_ids`; RFC 8601 5: a
/// receiver must delete such fields arriving from outside) from the header
/// section of `message`. Returns the message unchanged (borrowed) when
/// there is none.
pub fn strip_forged_auth_results<'a, S: AsRef<str>>(
    message: &'a [u8],
    ours: &[S],
) -> Cow<'a, [u8]> {
    let h = crate::mail::headers::scan(message);
    let forged = |f: &crate::mail::headers::Field| {
        f.is(message, "Authentication-Results") && {
            let id = authserv_id(f.value(message));
            ours.iter().any(|o| same_host(&id, o.as_ref()))
        }
    };
    if !h.fields.iter().any(forged) {
        return Cow::Borrowed(message);
    }
    let mut out = Vec::with_capacity(message.len());
    for f in h.fields.iter().filter(|f| !forged(f)) {
        out.extend_from_slice(f.raw(message));
    }
    out.extend_from_slice(&message[h.header_end..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_ours() {
        let msg = b"Received: x\r\nAuthentication-Results: mx.example.test;\r\n spf=pass\r\nAuthentication-Results: (c) other.test; dkim=pass\r\nauthentication-results:  MX.EXAMPLE.TEST ; dmarc=pass\r\nSubject: hi\r\n\r\nAuthentication-Results: mx.example.test; body\r\n";
        let out = strip_forged_auth_results(msg, &["mx.example.test"]);
        assert_eq!(
            &*out,
            &b"Received: x\r\nAuthentication-Results: (c) other.test; dkim=pass\r\nSubject: hi\r\n\r\nAuthentication-Results: mx.example.test; body\r\n"[..]
        );
        let clean = b"Subject: x\r\n\r\nbody";
        assert!(matches!(
            strip_forged_auth_results(clean, &["mx.example.test"]),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn authserv() {
        assert_eq!(authserv_id(b" (comment) host.test; spf=pass"), "host.test");
        assert_eq!(authserv_id(b" host.test 1; spf=pass"), "host.test");
        assert_eq!(authserv_id(b" (a (nested\\) one)) h.test;x"), "h.test");
        assert_eq!(authserv_id(b" \"h.test\"; spf=pass"), "h.test");
        assert_eq!(authserv_id(b"\r\n\th.test(c);none"), "h.test");
    }

    #[test]
    fn forged_variants_are_stripped() {
        let ours = ["mx.example.test", "filter.example.test"];
        for v in [
            "mx.example.test.; spf=pass",
            "MX.Example.Test; dkim=pass",
            "(trust me) mx.example.test; dmarc=pass",
            "\r\n mx.example.test\r\n ; spf=pass",
            "mx.example.test 1; spf=pass",
            "\"mx.example.test\"; spf=pass",
            "filter.example.test.; spf=pass",
        ] {
            let msg = format!("Authentication-Results: {v}\r\nSubject: x\r\n\r\nbody");
            let out = strip_forged_auth_results(msg.as_bytes(), &ours);
            assert_eq!(&*out, &b"Subject: x\r\n\r\nbody"[..], "{v:?}");
        }
        for v in [
            "mx.example.test.evil; spf=pass",
            "example.test; spf=pass",
            ".; none",
        ] {
            let msg = format!("Authentication-Results: {v}\r\n\r\nbody");
            assert!(
                matches!(
                    strip_forged_auth_results(msg.as_bytes(), &ours),
                    Cow::Borrowed(_)
                ),
                "{v:?}"
            );
        }
    }

    #[test]
    fn pvalues() {
        assert_eq!(pvalue("a@b.test"), "a@b.test");
        assert_eq!(pvalue("a b"), "\"a b\"");
    }

    #[test]
    fn a_quote_after_the_token_ends_it() {
        assert_eq!(authserv_id(b"mx.local.test\"; dkim=pass"), "mx.local.test");
        assert_eq!(authserv_id(b"e.EXE\"\r\n"), "e.EXE");
        assert_eq!(authserv_id(b"\"mx.local.test\"; spf=pass"), "mx.local.test");
    }
}
