//! The quarantine digest: one mail per user listing what was held for them
//! since their last digest, with a signed link per message and action.
//!
//! What each user has been told of is kept in the store's state tree
//! (`digest\0user\0LOGIN`: the ids listed and still held), written in the
//! same transaction that queues the digest, so a digest is never sent
//! twice for the same held mail nor lost by a crash. The time of the last
//! scheduled round (`digest\0last`) makes the schedule survive restarts: a
//! round missed while the gateway was down runs at start.
//!
//! A digest goes straight onto the queue (null reverse-path, `Auto-Submitted:
//! auto-generated`): it meets no rule, no limit and no quarantine, so it is
//! never itself digested.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeZone;

use crate::config::{Config, DigestSchedule};
use crate::mailbox::accounts::{Account, Accounts};
use crate::quarantine::links::{Action, Link, LinkKey};
use crate::store::wake::Scheduler;
use crate::store::{HeldEntry, QueueEntry, Store, StoreError, fmt_id, now_unix};

const LAST_ROUND: &[u8] = b"digest\0last";
/// Messages listed in one digest at most: a mail of links stays readable,
/// and a flood of held mail does not make one huge message.
const MAX_LISTED: usize = 200;

fn user_key(login: &str) -> Vec<u8> {
    [
        b"digest\0user\0".as_slice(),
        login.to_lowercase().as_bytes(),
    ]
    .concat()
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum DigestError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Accounts(String),
    #[error("no user \"{0}\" in the users file")]
    NoUser(String),
}

/// One digest queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sent {
    pub(crate) login: String,
    pub(crate) to: String,
    pub(crate) messages: usize,
    pub(crate) queue_id: u64,
}

/// Builds and queues digests; shared by the schedule, the control socket and the CLI.
pub(crate) struct Digester {
    pub(crate) cfg: Arc<Config>,
    pub(crate) store: Store,
    pub(crate) key: Arc<LinkKey>,
    /// Wakes delivery at once; `None` from the CLI without a running gateway
    /// (the digest waits in the queue for `serve`).
    pub(crate) scheduler: Option<Scheduler>,
    pub(crate) sent: Option<prometheus::IntCounter>,
}

/// A held message as the digest lists it.
struct Item {
    entry: HeldEntry,
    subject: String,
}

impl Digester {
    /// One round: a digest to each user (or only `only`) with held mail not
    /// yet listed to them; with `everything`, all their held mail is listed
    /// again. Returns what was queued, once it is durable.
    pub(crate) async fn run(
        &self,
        only: Option<&str>,
        everything: bool,
    ) -> Result<Vec<Sent>, DigestError> {
        let accounts =
            Accounts::from_config(&self.cfg).map_err(|e| DigestError::Accounts(e.to_string()))?;
        let users: Vec<Account> = match only {
            Some(login) => vec![
                accounts
                    .account(login)
                    .ok_or_else(|| DigestError::NoUser(login.to_string()))?,
            ],
            None => accounts.all().cloned().collect(),
        };
        let held = self.store.held_entries()?;
        let mut sent = Vec::new();
        for user in users {
            let Some(to) = user.addresses.first().cloned() else {
                continue;
            };
            let mine: Vec<&HeldEntry> = held
                .iter()
                .filter(|e| user.is_addressed(&e.recipient))
                .collect();
            let told: HashSet<u64> = self
                .store
                .get_state(&user_key(&user.login))?
                .and_then(|v| serde_json::from_slice(&v).ok())
                .unwrap_or_default();
            let mut new: Vec<&HeldEntry> = mine
                .iter()
                .copied()
                .filter(|e| everything || !told.contains(&e.id))
                .collect();
            if new.is_empty() {
                continue;
            }
            // Oldest first; what is past the cap waits for the next digest.
            let later = new.len().saturating_sub(MAX_LISTED);
            new.truncate(MAX_LISTED);
            let items: Vec<Item> = new
                .iter()
                .map(|e| Item {
                    subject: subject_of(&self.store, e),
                    entry: (*e).clone(),
                })
                .collect();
            let qid = self.store.next_id()?;
            let body = self.message(&user, &to, &items, mine.len(), later, qid);
            let entry = QueueEntry::new(
                qid,
                String::new(),
                [to.clone()],
                body.len() as u64,
                "127.0.0.1".into(),
                self.cfg.server.hostname.clone(),
            );
            // What this user has now been told of, among what is still held.
            let listed: HashSet<u64> = new.iter().map(|e| e.id).collect();
            let now_told: Vec<u64> = mine
                .iter()
                .map(|e| e.id)
                .filter(|id| told.contains(id) || listed.contains(id))
                .collect();
            let state = serde_json::to_vec(&now_told).unwrap_or_default();
            self.store
                .enqueue_with_state(&entry, &body, &user_key(&user.login), &state)?;
            sent.push(Sent {
                login: user.login.clone(),
                to,
                messages: items.len(),
                queue_id: qid,
            });
        }
        if !sent.is_empty() {
            self.store.durable().await?;
        }
        for s in &sent {
            tracing::info!(user = %s.login, to = %s.to, messages = s.messages, queued = %fmt_id(s.queue_id), "quarantine digest queued");
            if let Some(c) = &self.sent {
                c.inc();
            }
            if let Some(sch) = &self.scheduler {
                sch.now(s.queue_id);
            }
        }
        Ok(sent)
    }

    fn link(&self, user: &Account, e: &HeldEntry, action: Action) -> String {
        let token = self.key.sign(&Link {
            login: user.login.clone(),
            id: e.id,
            action,
            expires: now_unix() + self.cfg.quarantine.link_lifetime.0.as_secs() as i64,
        });
        format!(
            "{}/q/{token}",
            self.cfg.quarantine.web_url.trim().trim_end_matches('/')
        )
    }

    /// The digest mail: multipart/alternative, plain text and HTML.
    fn message(
        &self,
        user: &Account,
        to: &str,
        items: &[Item],
        held: usize,
        later: usize,
        qid: u64,
    ) -> Vec<u8> {
        let n = items.len();
        let title = if n == 1 {
            "1 message is held for you".to_string()
        } else {
            format!("{n} messages are held for you")
        };
        let retention = humantime::format_duration(self.cfg.quarantine.retention.0).to_string();
        let mut text = format!(
            "{title} at {host} (to {to}; {held} held in all).\r\n\
             They are not delivered unless you release them, and are deleted after {retention}.\r\n\
             Each link opens a page that asks you to confirm.\r\n\r\n",
            host = self.cfg.server.hostname,
        );
        let mut html = format!(
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
             <body style=\"font-family:sans-serif\"><h2>{t}</h2><p>At {host}, for {to} ({held} held in all). \
             They are not delivered unless you release them, and are deleted after {r}. \
             Each link opens a page that asks you to confirm.</p>\
             <table cellpadding=\"6\" style=\"border-collapse:collapse\">\
             <tr style=\"text-align:left;background:#eee\"><th>Date</th><th>From</th><th>Subject</th>\
             <th>Reason</th><th>Size</th><th>Actions</th></tr>",
            t = esc(&title),
            host = esc(&self.cfg.server.hostname),
            to = esc(to),
            r = esc(&retention),
        );
        for (i, it) in items.iter().enumerate() {
            let e = &it.entry;
            let date = local_time(e.received);
            let from = if e.sender.is_empty() {
                "<>".to_string()
            } else {
                crate::mail::one_line(&e.sender)
            };
            let size = human_size(e.size);
            let reason = crate::mail::one_line(&e.reason);
            text.push_str(&format!(
                "{}. {date}\r\n   From:    {from}\r\n   Subject: {}\r\n   Reason:  {reason}\r\n   Size:    {size}\r\n",
                i + 1,
                it.subject
            ));
            html.push_str(&format!(
                "<tr style=\"border-top:1px solid #ccc\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>",
                esc(&date),
                esc(&from),
                esc(&it.subject),
                esc(&reason),
                esc(&size)
            ));
            for (j, a) in Action::ALL.into_iter().enumerate() {
                let url = self.link(user, e, a);
                text.push_str(&format!("   {:<25} {url}\r\n", format!("{}:", a.label())));
                if j > 0 {
                    html.push_str(" | ");
                }
                html.push_str(&format!("<a href=\"{}\">{}</a>", esc(&url), esc(a.label())));
            }
            text.push_str("\r\n");
            html.push_str("</td></tr>");
        }
        html.push_str("</table>");
        if later > 0 {
            let more = format!(
                "{later} more will be listed in the next digest; your quarantine account (IMAP or POP3) shows them all."
            );
            text.push_str(&more);
            text.push_str("\r\n");
            html.push_str(&format!("<p>{}</p>", esc(&more)));
        }
        html.push_str("</body></html>");
        let domain = self
            .cfg
            .relay
            .domains
            .first()
            .cloned()
            .unwrap_or_else(|| self.cfg.server.hostname.clone());
        mail_builder::MessageBuilder::new()
            .from((
                "Postern quarantine".to_string(),
                format!("postmaster@{domain}"),
            ))
            .to(to)
            .subject(format!("Quarantine: {title}"))
            .message_id(format!(
                "digest.{}@{}",
                fmt_id(qid),
                self.cfg.server.hostname
            ))
            .date(now_unix())
            .header(
                "Auto-Submitted",
                mail_builder::headers::raw::Raw::new("auto-generated"),
            )
            .header(
                "X-Postern-Digest",
                mail_builder::headers::raw::Raw::new(crate::mail::token(&user.login)),
            )
            .text_body(text)
            .html_body(html)
            .write_to_vec()
            .unwrap_or_default()
    }
}

/// The held message's Subject, decoded, on one line ("" when it has none).
pub(crate) fn subject_of(store: &Store, e: &HeldEntry) -> String {
    let Ok(Some(body)) = store.held_body(e) else {
        return String::new();
    };
    let header = &body[..crate::mail::headers::body_start(&body)];
    // mail-parser has debug assertions on odd input; a message from outside
    // must not take the digest down.
    std::panic::catch_unwind(|| {
        mail_parser::MessageParser::default()
            .parse_headers(header)
            .and_then(|m| m.subject().map(str::to_string))
    })
    .ok()
    .flatten()
    .map(|s| crate::mail::one_line(&s))
    .unwrap_or_default()
}

/// Escape for HTML text and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `2026-12-02 08:14 +0100`, in the server's time zone.
pub(crate) fn local_time(unix: i64) -> String {
    chrono::Local
        .timestamp_opt(unix, 0)
        .single()
        .map(|t| t.format("%Y-%m-%d %H:%M %z").to_string())
        .unwrap_or_default()
}

pub(crate) fn human_size(n: u64) -> String {
    match n {
        n if n < 1000 => format!("{n} B"),
        n if n < 1_000_000 => format!("{:.0} KB", n as f64 / 1000.0),
        n => format!("{:.1} MB", n as f64 / 1_000_000.0),
    }
}

/// When the round after one at `last` (unix seconds) is due.
pub(crate) fn next_round(schedule: DigestSchedule, last: i64) -> Option<i64> {
    match schedule {
        DigestSchedule::Off => None,
        DigestSchedule::Every(d) => Some(last + d.as_secs().max(1) as i64),
        DigestSchedule::Daily { hour, minute } => {
            let last_local = chrono::Local.timestamp_opt(last, 0).single()?;
            let mut day = last_local.date_naive();
            // The first HH:MM strictly after `last`; a time skipped by a DST
            // change runs an hour later.
            for _ in 0..3 {
                let at = day.and_hms_opt(hour, minute, 0)?;
                let t = chrono::Local
                    .from_local_datetime(&at)
                    .earliest()
                    .or_else(|| {
                        chrono::Local
                            .from_local_datetime(&(at + chrono::Duration::hours(1)))
                            .earliest()
                    })?
                    .timestamp();
                if t > last {
                    return Some(t);
                }
                day = day.succ_opt()?;
            }
            None
        }
    }
}

/// The schedule: wait for the next round, run it, record it; a round that
/// fell due while the gateway was down runs now.
pub(crate) async fn schedule_loop(d: Arc<Digester>, schedule: DigestSchedule) {
    if schedule == DigestSchedule::Off {
        return;
    }
    loop {
        let last = match d.store.get_state(LAST_ROUND) {
            Ok(Some(v)) => v
                .as_slice()
                .try_into()
                .ok()
                .map(i64::from_be_bytes)
                .unwrap_or_else(now_unix),
            Ok(None) => {
                // First start with a digest: the first round is one period from now.
                let now = now_unix();
                if let Err(e) = record_round(&d.store, now).await {
                    tracing::error!(error = %e, "digest schedule cannot be stored");
                }
                now
            }
            Err(e) => {
                tracing::error!(error = %e, "digest schedule unreadable; retrying in a minute");
                tokio::time::sleep(Duration::from_secs(60)).await;
                continue;
            }
        };
        let Some(due) = next_round(schedule, last) else {
            return;
        };
        let wait = due - now_unix();
        if wait > 0 {
            // Re-read at least every minute: the clock may be set meanwhile.
            tokio::time::sleep(Duration::from_secs(wait.min(60) as u64)).await;
            continue;
        }
        match d.run(None, false).await {
            Ok(sent) => {
                tracing::info!(digests = sent.len(), "digest round done");
                if let Err(e) = record_round(&d.store, now_unix()).await {
                    tracing::error!(error = %e, "digest round cannot be recorded");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "digest round failed; retrying in a minute");
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    }
}

async fn record_round(store: &Store, at: i64) -> Result<(), StoreError> {
    store.put_state(LAST_ROUND, &at.to_be_bytes())?;
    store.durable().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_follow_the_schedule() {
        assert_eq!(next_round(DigestSchedule::Off, 0), None);
        assert_eq!(
            next_round(DigestSchedule::Every(Duration::from_secs(3600)), 100),
            Some(3700)
        );
        let daily = DigestSchedule::Daily { hour: 8, minute: 0 };
        let at8 = chrono::Local
            .with_ymd_and_hms(2026, 12, 2, 8, 0, 0)
            .earliest()
            .unwrap()
            .timestamp();
        // Just before: today at 08:00; at or after: tomorrow's.
        assert_eq!(next_round(daily, at8 - 60), Some(at8));
        let next = next_round(daily, at8).unwrap();
        assert!((next - at8 - 86_400).abs() <= 3600, "{next} {at8}");
    }

    /// A digest lists at most MAX_LISTED; the rest comes in the next one,
    /// and nothing is listed twice.
    #[tokio::test]
    async fn a_flood_is_listed_over_several_digests_each_message_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg =
            Config::from_str(Config::DEFAULT_TOML, std::path::Path::new("postern.toml")).unwrap();
        cfg.policies.dir = dir.path().to_path_buf();
        std::fs::write(
            dir.path().join("users.toml"),
            format!(
                "[[user]]\nlogin = \"alice\"\npassword = \"{}\"\naddresses = [\"alice@l.test\"]\n",
                crate::mailbox::accounts::hash_password("pw")
            ),
        )
        .unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let t = crate::store::test_held_template();
        for _ in 0..MAX_LISTED + 5 {
            store
                .quarantine(&t, &["alice@l.test".into()], b"Subject: s\r\n\r\nb")
                .unwrap();
        }
        let d = Digester {
            cfg: Arc::new(cfg),
            store: store.clone(),
            key: Arc::new(LinkKey::from_bytes(&[1; 32])),
            scheduler: None,
            sent: None,
        };
        let first = d.run(None, false).await.unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].messages, MAX_LISTED);
        let body = store.body(first[0].queue_id).unwrap().unwrap();
        assert!(String::from_utf8_lossy(&body).contains("5 more will be listed"));
        let second = d.run(None, false).await.unwrap();
        assert_eq!(second[0].messages, 5);
        assert!(d.run(None, false).await.unwrap().is_empty());
        assert_eq!(
            d.run(Some("alice"), true).await.unwrap()[0].messages,
            MAX_LISTED
        );
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
