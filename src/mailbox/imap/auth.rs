//! Commands valid in any state: CAPABILITY, NOOP/CHECK, LOGOUT, STARTTLS, LOGIN and
//! AUTHENTICATE PLAIN (RFC 3501 6.1, 6.2; SASL-IR RFC 4959). No credentials are accepted
//! before TLS (LOGINDISABLED); the password check itself is the shell's ([`Step::Login`]).

use imap_codec::imap_types::auth::AuthMechanism;
use imap_codec::imap_types::command::CommandBody;

use super::core::{ImapCore, Step, tagged, unavailable};
use crate::mailbox::accounts::Account;

const MAX_AUTH_FAILURES: u32 = 3;

impl ImapCore {
    pub(super) fn capabilities(&self) -> String {
        let mut c =
            String::from("IMAP4rev1 LITERAL+ SASL-IR ID NAMESPACE IDLE UIDPLUS MOVE UNSELECT");
        if self.account.is_none() {
            if self.tls {
                c.push_str(" AUTH=PLAIN");
            } else {
                c.push_str(" STARTTLS LOGINDISABLED");
            }
        }
        c
    }

    pub(crate) fn greeting(&self) -> Vec<u8> {
        format!(
            "* OK [CAPABILITY {}] {} IMAP quarantine ready\r\n",
            self.capabilities(),
            self.hostname
        )
        .into_bytes()
    }

    pub(super) fn any_state(&mut self, tag: &str, body: CommandBody<'_>) -> Step {
        match body {
            CommandBody::Capability => {
                let mut out = format!("* CAPABILITY {}\r\n", self.capabilities()).into_bytes();
                out.extend_from_slice(&tagged(tag, "OK", "CAPABILITY completed"));
                Step::Reply(out)
            }
            CommandBody::Noop => self.noop(tag, "NOOP"),
            // RFC 2971: what the client says is not used; we say only our name.
            CommandBody::Id { .. } => {
                let mut out = b"* ID (\"name\" \"Postern\")\r\n".to_vec();
                out.extend_from_slice(&tagged(tag, "OK", "ID completed"));
                Step::Reply(out)
            }
            CommandBody::Check => self.noop(tag, "CHECK"),
            CommandBody::Logout => {
                let mut out = format!("* BYE {} logging out\r\n", self.hostname).into_bytes();
                out.extend_from_slice(&tagged(tag, "OK", "LOGOUT completed"));
                Step::Close(out)
            }
            CommandBody::StartTLS => {
                if self.tls {
                    self.bad(Some(tag), "TLS already active")
                } else if self.account.is_some() {
                    self.bad(Some(tag), "STARTTLS only before login")
                } else {
                    Step::StartTls(tagged(tag, "OK", "Begin TLS negotiation now"))
                }
            }
            CommandBody::Login { username, password } => {
                let login = String::from_utf8(username.as_ref().to_vec());
                let password = String::from_utf8(password.declassify().as_ref().to_vec());
                self.login(tag, login.ok(), password.ok())
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                // imap-codec has decoded the base64 already; sasl_response wants it encoded.
                let ir = initial_response.map(|ir| {
                    base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        ir.declassify().as_ref(),
                    )
                });
                self.authenticate(tag, mechanism, ir)
            }
            _ => self.bad(Some(tag), "Command not supported"),
        }
    }

    /// NOOP and CHECK: just the updates. Here the sync is the whole
    /// command, so a store failure is the answer.
    fn noop(&mut self, tag: &str, verb: &str) -> Step {
        let mut out = Vec::new();
        if let Err(e) = self.sync(&mut out, true) {
            out.extend_from_slice(&unavailable(tag, verb, &e));
            return Step::Reply(out);
        }
        out.extend_from_slice(&tagged(tag, "OK", &format!("{verb} completed")));
        Step::Reply(out)
    }

    /// Why `what` (LOGIN, Authentication) may not start now: already
    /// logged in, or no TLS yet (passwords only over TLS, RFC 3501 6.2.3).
    fn refuse_login(&mut self, tag: &str, what: &str) -> Option<Step> {
        if self.account.is_some() {
            return Some(self.bad(Some(tag), "Already logged in"));
        }
        (!self.tls).then(|| {
            Step::Reply(tagged(
                tag,
                "NO",
                &format!("[PRIVACYREQUIRED] {what} is disabled until STARTTLS"),
            ))
        })
    }

    /// LOGIN; a name or password that is not UTF-8 is simply a failed login.
    fn login(&mut self, tag: &str, login: Option<String>, password: Option<String>) -> Step {
        if let Some(refused) = self.refuse_login(tag, "LOGIN") {
            return refused;
        }
        let (Some(login), Some(password)) = (login, password) else {
            return self.login_result(tag, None);
        };
        Step::Login {
            tag: tag.to_string(),
            login,
            password,
        }
    }

    /// AUTHENTICATE PLAIN, with the initial response (base64) if the client sent one.
    fn authenticate(
        &mut self,
        tag: &str,
        mechanism: AuthMechanism<'_>,
        ir: Option<String>,
    ) -> Step {
        if let Some(refused) = self.refuse_login(tag, "Authentication") {
            return refused;
        }
        if mechanism != AuthMechanism::Plain {
            return Step::Reply(tagged(tag, "NO", "Unsupported mechanism; PLAIN only"));
        }
        match ir {
            Some(b64) => self.sasl_response(tag, b64.as_bytes()),
            None => Step::SaslContinue {
                tag: tag.to_string(),
            },
        }
    }

    pub(crate) fn login_result(&mut self, tag: &str, account: Option<Account>) -> Step {
        match account {
            Some(a) => {
                self.account = Some(a);
                Step::Reply(tagged(
                    tag,
                    "OK",
                    &format!("[CAPABILITY {}] Logged in", self.capabilities()),
                ))
            }
            None => {
                self.auth_failures += 1;
                let mut out = tagged(tag, "NO", "[AUTHENTICATIONFAILED] Invalid credentials");
                if self.auth_failures >= MAX_AUTH_FAILURES {
                    out.extend_from_slice(b"* BYE Too many failed logins\r\n");
                    Step::Close(out)
                } else {
                    Step::Reply(out)
                }
            }
        }
    }

    /// The login budget refused the attempt unchecked: `UNAVAILABLE`
    /// (RFC 5530: temporary, try later), not `AUTHENTICATIONFAILED`, which
    /// would make a client ask its user for a new password.
    pub(crate) fn login_refused(&mut self, tag: &str) -> Step {
        Step::Reply(tagged(
            tag,
            "NO",
            "[UNAVAILABLE] Too many failed logins from your address; try again later",
        ))
    }

    /// The client's reply to `+ ` during AUTHENTICATE PLAIN.
    pub(crate) fn sasl_response(&mut self, tag: &str, line: &[u8]) -> Step {
        if line == b"*" {
            return Step::Reply(tagged(tag, "BAD", "Authentication cancelled"));
        }
        match crate::mailbox::pop3::decode_plain(line) {
            Some((login, password)) => Step::Login {
                tag: tag.to_string(),
                login,
                password,
            },
            None => self.bad(Some(tag), "Malformed SASL PLAIN response"),
        }
    }
}
