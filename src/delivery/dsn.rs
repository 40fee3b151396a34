//! Delivery status notifications (RFC 3464): the bounce sent to the sender
//! when recipients fail permanently or the message outlives `max_age`.

use crate::mail::{Enhanced, headers, one_line};
use crate::store::{QueueEntry, Recipient};

/// Why a bounce is not sent, as `postern_dsn_suppressed_total{reason}`
/// says it: `auth_failed` for mail that failed SPF or DMARC (its sender is
/// most likely forged), `outside_sender` for mail from outside (neither
/// trusted nor authenticated) whose sender is outside `domains`: with
/// recipient verification such mail reached only recipients the backend
/// said it has, so a bounce would go to a stranger who may be forged.
pub(crate) fn suppressed(entry: &QueueEntry, ours: impl Fn(&str) -> bool) -> Option<&'static str> {
    if let Some(t) = &entry.trace
        && (t.checks.spf == "fail" || t.checks.dmarc == "fail")
    {
        return Some("auth_failed");
    }
    let domain = entry.sender.rsplit_once('@').map_or("", |(_, d)| d);
    if entry.from_outside && !ours(domain.trim_end_matches('.')) {
        return Some("outside_sender");
    }
    None
}

/// RFC 5322 2.1.1: no line longer than 998 octets (CRLF excluded).
const MAX_LINE: usize = 998;
/// Longest peer-supplied value in a report line (diagnostic, address,
/// remote host), in bytes: with its field name it stays under [`MAX_LINE`].
const MAX_VALUE: usize = 900;

/// One failed recipient for the report.
pub(crate) struct Failure<'a> {
    pub(crate) recipient: &'a Recipient,
    /// `Status:` (RFC 3463), e.g. `5.1.1`, or `5.4.7` for expiry.
    pub(crate) status: Enhanced,
    /// The reply that failed it, as `Diagnostic-Code: smtp; ...` shows it.
    pub(crate) diagnostic: String,
}

/// Text a peer supplied (the remote reply, an address) as one report line:
/// no control characters, at most [`MAX_VALUE`] bytes.
fn value(s: &str) -> String {
    let mut v = one_line(s);
    let mut end = v.len().min(MAX_VALUE);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    v.truncate(end);
    v
}

/// The original's header section as the report quotes it: CRLF line ends
/// only (a bare CR or LF ends a line too, as `smtp::data` would have
/// made it), no empty lines, each line cut at [`MAX_LINE`] octets, whatever
/// the stored message holds.
fn quoted_header(original: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in headers::header_fields_only(original).split(|&b| b == b'\n' || b == b'\r') {
        if !line.is_empty() {
            out.extend_from_slice(&line[..line.len().min(MAX_LINE)]);
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// Build the multipart/report. `original` is the failed message; only its
/// header is returned (text/rfc822-headers), which is what senders need and
/// keeps bounces small.
pub(crate) fn build(
    hostname: &str,
    sender: &str,
    queue_id: &str,
    arrival_unix: i64,
    failures: &[Failure<'_>],
    original: &[u8],
) -> Vec<u8> {
    let now = chrono::Utc::now();
    let quoted = quoted_header(original);
    let arrival = chrono::DateTime::from_timestamp(arrival_unix, 0)
        .unwrap_or(now)
        .to_rfc2822();
    let sender = value(sender);
    let mut human = String::new();
    for f in failures {
        let (address, diagnostic) = (value(&f.recipient.address), value(&f.diagnostic));
        human.push_str(&format!("<{address}>:\r\n    {diagnostic}\r\n"));
    }
    let mut per_rcpt = String::new();
    for f in failures {
        per_rcpt.push_str(&format!(
            "Final-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {}\r\n",
            value(&f.recipient.address),
            f.status
        ));
        if let Some(remote) = &f.recipient.remote {
            per_rcpt.push_str(&format!("Remote-MTA: dns; {}\r\n", value(remote)));
        }
        per_rcpt.push_str(&format!(
            "Diagnostic-Code: smtp; {}\r\n\r\n",
            value(&f.diagnostic)
        ));
    }
    let boundary = boundary_absent_from(
        &format!("=_{queue_id}.{}", now.timestamp()),
        &[&quoted, human.as_bytes(), per_rcpt.as_bytes()],
    );
    let mut out = format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n\
         To: <{sender}>\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
         Date: {date}\r\n\
         Message-ID: <{queue_id}.{ts}.dsn@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated delivery status notification.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         This is the mail system at {hostname}.\r\n\
         \r\n\
         Your message (queue id {queue_id}) could not be delivered to one or more\r\n\
         recipients. It has been returned below.\r\n\
         \r\n\
         {human}\r\n\
         --{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Postern-Queue-ID: {queue_id}\r\n\
         Arrival-Date: {arrival}\r\n\
         \r\n\
         {per_rcpt}\
         --{boundary}\r\n\
         Content-Type: text/rfc822-headers\r\n\
         \r\n",
        date = now.to_rfc2822(),
        ts = now.timestamp_micros(),
    )
    .into_bytes();
    out.extend_from_slice(&quoted);
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// `base`, or `base.N` for the first N that occurs in none of `parts`: the
/// quoted header is the sender's, and a boundary it could guess (found by
/// fuzz/ target dsn: the queue id and the second are no secret) would let it
/// end the report early and add parts of its own to the bounce. Short (RFC
/// 2046: at most 70 characters) and never a substring of the content, so no
/// content line starts with `--` and it.
fn boundary_absent_from(base: &str, parts: &[&[u8]]) -> String {
    let found = |b: &str| {
        parts
            .iter()
            .any(|p| p.windows(b.len()).any(|w| w == b.as_bytes()))
    };
    let mut boundary = base.to_string();
    let mut n = 0u64;
    while found(&boundary) {
        n += 1;
        boundary = format!("{base}.{n}");
    }
    boundary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RcptStatus;

    #[test]
    fn backscatter_is_recognised() {
        let ours = |d: &str| d == "local.test";
        let mut e = QueueEntry::new(
            1,
            "s@far.test".into(),
            ["u@local.test".into()],
            1,
            String::new(),
            String::new(),
        );
        // From a trusted or authenticated client: its bounces go.
        assert_eq!(suppressed(&e, ours), None);
        e.from_outside = true;
        assert_eq!(suppressed(&e, ours), Some("outside_sender"));
        e.sender = "s@local.test".into();
        assert_eq!(suppressed(&e, ours), None);
        // Failed SPF or DMARC: nowhere, whoever sent it.
        for (spf, dmarc) in [("fail", "pass"), ("pass", "fail")] {
            let mut t = crate::policy::Trace::default();
            t.checks.spf = spf.into();
            t.checks.dmarc = dmarc.into();
            e.trace = Some(t);
            e.from_outside = false;
            assert_eq!(suppressed(&e, ours), Some("auth_failed"), "{spf} {dmarc}");
        }
        e.trace.as_mut().unwrap().checks.dmarc = "softfail".into();
        e.trace.as_mut().unwrap().checks.spf = "softfail".into();
        assert_eq!(suppressed(&e, ours), None);
    }

    #[test]
    fn report_has_the_parts() {
        let r = Recipient {
            address: "x@y.test".into(),
            status: RcptStatus::Failed,
            last_reply: None,
            remote: Some("mx.y.test".into()),
            tls: None,
        };
        let dsn = build(
            "gw.test",
            "s@a.test",
            "00AB",
            0,
            &[Failure {
                recipient: &r,
                status: Enhanced::new(5, 1, 1),
                diagnostic: "550 5.1.1 no such user".into(),
            }],
            b"Subject: hi\r\nFrom: s@a.test\r\n\r\nbody\r\n",
        );
        let t = String::from_utf8(dsn).unwrap();
        assert!(t.contains("report-type=delivery-status"));
        assert!(t.contains("Final-Recipient: rfc822; x@y.test"));
        assert!(t.contains("Status: 5.1.1"));
        assert!(t.contains("Subject: hi"));
        assert!(!t.contains("\r\nbody\r\n"));
    }

    fn crlf_only_and_short(dsn: &[u8]) {
        for (i, &c) in dsn.iter().enumerate() {
            match c {
                b'\n' => assert!(i > 0 && dsn[i - 1] == b'\r', "bare LF at {i}"),
                b'\r' => assert_eq!(dsn.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
                _ => {}
            }
        }
        assert!(dsn.split(|&b| b == b'\n').all(|l| l.len() <= MAX_LINE + 1));
    }

    /// Found by `fuzz/` (target dsn): an original whose header section is a
    /// lone CR was quoted raw, a bare CR in the report; so were long header
    /// lines and a multi-line remote reply.
    #[test]
    fn the_quote_and_the_values_are_crlf_lines_of_998() {
        let r = Recipient {
            address: "x@y.test".into(),
            status: RcptStatus::Failed,
            last_reply: None,
            remote: Some("mx\r\n.y.test".into()),
            tls: None,
        };
        let diagnostic = format!("550-5.1.1 first\r\n550 5.1.1 {}", "\u{e9}".repeat(600));
        let fail = |original: &[u8]| {
            build(
                "gw.test",
                "s@a.test",
                "00AB",
                0,
                &[Failure {
                    recipient: &r,
                    status: Enhanced::new(5, 1, 1),
                    diagnostic: diagnostic.clone(),
                }],
                original,
            )
        };
        crlf_only_and_short(&fail(b"\r"));
        let long = format!("Subject: {}\nX: a\rY: b\r\n\r\nbody", "s".repeat(5000));
        let dsn = fail(long.as_bytes());
        crlf_only_and_short(&dsn);
        let t = String::from_utf8_lossy(&dsn);
        assert!(t.contains("\r\nX: a\r\nY: b\r\n"), "{t}");
        assert!(t.contains("Remote-MTA: dns; mx  .y.test\r\n"));
    }

    #[test]
    fn a_header_that_guesses_the_boundary_cannot_end_the_report() {
        let now = chrono::Utc::now().timestamp();
        let mut original = String::from("Subject: x\r\n");
        for ts in now - 2..now + 3 {
            original.push_str(&format!("X-A: --=_Q1.{ts}\r\nX-B: --=_Q1.{ts}.1\r\n"));
        }
        original.push_str("\r\nbody\r\n");
        let r = Recipient {
            address: "bob@local.test".into(),
            status: RcptStatus::Failed,
            last_reply: None,
            remote: None,
            tls: None,
        };
        let f = Failure {
            recipient: &r,
            status: Enhanced::new(5, 1, 1),
            diagnostic: "550 no".into(),
        };
        let out = build(
            "mx.test",
            "a@far.test",
            "Q1",
            now,
            &[f],
            original.as_bytes(),
        );
        let m = mail_parser::MessageParser::default().parse(&out).unwrap();
        // text, delivery-status, headers: three parts under the report.
        assert_eq!(m.parts.len(), 4, "{}", String::from_utf8_lossy(&out));
        assert_eq!(boundary_absent_from("b", &[b"xx b yy", b"b.1"]), "b.2");
    }
}
