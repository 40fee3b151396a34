//! POP3 command lines parsed into [`Command`] before any state sees them, so
//! the handlers match on types and every syntax error gets one clear `-ERR`.

/// One client command (RFC 1939, RFC 2449 CAPA, RFC 2595 STLS, RFC 5034 AUTH).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Capa,
    Quit,
    Noop,
    Stls,
    /// The rest of the line: a name may contain spaces.
    User(String),
    /// The rest of the line: a password may contain spaces, or be empty.
    Pass(String),
    /// `AUTH` alone lists the mechanisms; the initial response is still base64.
    Auth {
        mechanism: Option<String>,
        initial: Option<String>,
    },
    Apop,
    Stat,
    List(Option<u32>),
    Uidl(Option<u32>),
    Retr(u32),
    Top {
        msg: u32,
        lines: usize,
    },
    Dele(u32),
    Rset,
}

/// Why a line is not a command; the text goes out after `-ERR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyntaxError {
    NotUtf8,
    Unknown,
    /// Known command, wrong arguments.
    Arguments(&'static str),
}

impl SyntaxError {
    pub(crate) fn text(self) -> &'static str {
        match self {
            SyntaxError::NotUtf8 => "command is not UTF-8",
            SyntaxError::Unknown => "unknown command or not allowed in this state",
            SyntaxError::Arguments(t) => t,
        }
    }
}

/// A message number; RFC 1939 numbers are decimal and start at 1 (0 is
/// left to the handler, which answers "no such message").
fn number(arg: Option<&&str>) -> Result<u32, SyntaxError> {
    arg.and_then(|a| a.parse().ok())
        .ok_or(SyntaxError::Arguments("bad message number"))
}

fn optional_number(arg: Option<&&str>) -> Result<Option<u32>, SyntaxError> {
    match arg {
        None => Ok(None),
        some => number(some).map(Some),
    }
}

/// Parse one command line (without CRLF). Arguments beyond those a command
/// takes are ignored, as they always were.
pub(crate) fn parse(line: &[u8]) -> Result<Command, SyntaxError> {
    let text = std::str::from_utf8(line).map_err(|_| SyntaxError::NotUtf8)?;
    let (verb, rest) = text.split_once(' ').unwrap_or((text, ""));
    let argv: Vec<&str> = rest.split_ascii_whitespace().collect();
    Ok(match verb.to_ascii_uppercase().as_str() {
        "CAPA" => Command::Capa,
        "QUIT" => Command::Quit,
        "NOOP" => Command::Noop,
        "STLS" if rest.is_empty() => Command::Stls,
        "STLS" => return Err(SyntaxError::Arguments("STLS takes no argument")),
        "USER" if rest.is_empty() => return Err(SyntaxError::Arguments("USER needs a name")),
        "USER" => Command::User(rest.to_string()),
        "PASS" => Command::Pass(rest.to_string()),
        "AUTH" => Command::Auth {
            mechanism: argv.first().map(|s| s.to_string()),
            initial: argv.get(1).map(|s| s.to_string()),
        },
        "APOP" => Command::Apop,
        "STAT" => Command::Stat,
        "LIST" => Command::List(optional_number(argv.first())?),
        "UIDL" => Command::Uidl(optional_number(argv.first())?),
        "RETR" => Command::Retr(number(argv.first())?),
        "TOP" => Command::Top {
            msg: number(argv.first())?,
            lines: argv
                .get(1)
                .and_then(|a| a.parse().ok())
                .ok_or(SyntaxError::Arguments("TOP needs a line count"))?,
        },
        "DELE" => Command::Dele(number(argv.first())?),
        "RSET" => Command::Rset,
        _ => return Err(SyntaxError::Unknown),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_and_rejects_bad_arguments() {
        assert_eq!(parse(b"capa"), Ok(Command::Capa));
        assert_eq!(
            parse(b"PASS pw with space"),
            Ok(Command::Pass("pw with space".into()))
        );
        assert_eq!(parse(b"PASS"), Ok(Command::Pass(String::new())));
        assert_eq!(parse(b"LIST"), Ok(Command::List(None)));
        assert_eq!(parse(b"uidl 2"), Ok(Command::Uidl(Some(2))));
        assert_eq!(parse(b"TOP 1 0"), Ok(Command::Top { msg: 1, lines: 0 }));
        assert_eq!(
            parse(b"AUTH PLAIN ="),
            Ok(Command::Auth {
                mechanism: Some("PLAIN".into()),
                initial: Some("=".into())
            })
        );
        assert_eq!(
            parse(b"RETR x"),
            Err(SyntaxError::Arguments("bad message number"))
        );
        assert_eq!(
            parse(b"TOP 1"),
            Err(SyntaxError::Arguments("TOP needs a line count"))
        );
        assert_eq!(
            parse(b"USER"),
            Err(SyntaxError::Arguments("USER needs a name"))
        );
        assert_eq!(
            parse(b"STLS now"),
            Err(SyntaxError::Arguments("STLS takes no argument"))
        );
        assert_eq!(parse(b"\xff"), Err(SyntaxError::NotUtf8));
        assert_eq!(parse(b""), Err(SyntaxError::Unknown));
        assert_eq!(parse(b"XYZZY"), Err(SyntaxError::Unknown));
    }
}
