//! SMTP replies as a type: code, enhanced status code and text kept apart.
//!
//! The session, the verdicts and the delivery client all speak in [`Reply`],
//! so no module has to parse a status code back out of a string.

use std::fmt;

/// An enhanced mail system status code (RFC 3463): `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Enhanced {
    /// 2 (success), 4 (persistent transient) or 5 (permanent).
    pub class: u8,
    pub(crate) subject: u16,
    pub(crate) detail: u16,
}

impl Enhanced {
    pub const fn new(class: u8, subject: u16, detail: u16) -> Enhanced {
        Enhanced {
            class,
            subject,
            detail,
        }
    }

    /// Parse `"5.7.1"`; `None` unless it has the RFC 3463 shape.
    pub(crate) fn parse(s: &str) -> Option<Enhanced> {
        let mut it = s.split('.');
        let class: u8 = it.next()?.parse().ok()?;
        let subject: u16 = it.next()?.parse().ok()?;
        let detail: u16 = it.next()?.parse().ok()?;
        if it.next().is_some() || !matches!(class, 2 | 4 | 5) || subject > 999 || detail > 999 {
            return None;
        }
        Some(Enhanced::new(class, subject, detail))
    }

    /// The same condition, made permanent (`4.4.1` → `5.4.1`), as a DSN
    /// says when a temporary failure has lasted past `max_age`.
    pub(crate) fn permanent(self) -> Enhanced {
        Enhanced { class: 5, ..self }
    }
}

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// One SMTP reply. `text` never holds CR or LF (see [`Reply::new`]); a
/// multi-line reply is several `lines`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    pub text: String,
}

impl Reply {
    /// A reply with an enhanced code. The text is made safe for one line.
    pub fn new(code: u16, enhanced: Enhanced, text: impl AsRef<str>) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            text: super::one_line(text.as_ref()),
        }
    }

    /// A reply without an enhanced code (greeting, 354, HELO).
    pub(crate) fn plain(code: u16, text: impl AsRef<str>) -> Reply {
        Reply {
            code,
            enhanced: None,
            text: super::one_line(text.as_ref()),
        }
    }

    /// Split text such as `"5.7.1 go away"` (what scripts and remote
    /// servers write) into enhanced code and text. Without a code, one
    /// that fits the reply code is supplied (`x.0.0`).
    pub(crate) fn parse_text(code: u16, text: &str) -> Reply {
        let text = super::one_line(text);
        let (first, rest) = match text.split_once(' ') {
            Some((a, b)) => (a, b.trim_start()),
            None => (text.as_str(), ""),
        };
        match Enhanced::parse(first) {
            Some(e) => Reply {
                code,
                enhanced: Some(e),
                text: rest.to_string(),
            },
            None => {
                let class = (code / 100) as u8;
                Reply {
                    code,
                    enhanced: matches!(class, 2 | 4 | 5).then(|| Enhanced::new(class, 0, 0)),
                    text,
                }
            }
        }
    }

    pub(crate) fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The reply as one wire line, CRLF included.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + 16);
        self.write_line(&mut out, true);
        out
    }

    /// Append this reply as one line; `last = false` writes `250-...` for
    /// a multi-line reply.
    pub(crate) fn write_line(&self, out: &mut Vec<u8>, last: bool) {
        use std::io::Write;
        let sep = if last { ' ' } else { '-' };
        let _ = match self.enhanced {
            Some(e) if self.text.is_empty() => write!(out, "{}{sep}{e}\r\n", self.code),
            Some(e) => write!(out, "{}{sep}{e} {}\r\n", self.code, self.text),
            None => write!(out, "{}{sep}{}\r\n", self.code, self.text),
        };
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.enhanced {
            Some(e) if self.text.is_empty() => write!(f, "{} {e}", self.code),
            Some(e) => write!(f, "{} {e} {}", self.code, self.text),
            None => write!(f, "{} {}", self.code, self.text),
        }
    }
}

/// One reply line with its enhanced status code (RFC 2034), as wire bytes.
pub(crate) fn line(code: u16, enhanced: Enhanced, text: &str) -> Vec<u8> {
    Reply::new(code, enhanced, text).to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format() {
        let r = Reply::parse_text(550, "5.7.1 go\r\naway");
        assert_eq!(r.enhanced, Some(Enhanced::new(5, 7, 1)));
        assert_eq!(r.text, "go  away");
        assert_eq!(r.to_bytes(), b"550 5.7.1 go  away\r\n");
        let r = Reply::parse_text(451, "try later");
        assert_eq!(r.to_string(), "451 4.0.0 try later");
        assert_eq!(Reply::plain(354, "go").to_bytes(), b"354 go\r\n");
        assert_eq!(
            Enhanced::parse("4.4.1").map(Enhanced::permanent),
            Some(Enhanced::new(5, 4, 1))
        );
        assert_eq!(Enhanced::parse("4.4"), None);
        assert_eq!(Enhanced::parse("1.2.3"), None);
    }
}
