//! The `postern` command: argument parsing and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use postern::admin::{self, Filter, ListRequest, Request};
use postern::config::Config;
use postern::mailbox::accounts::Accounts;
use postern::policy::Policy;
use postern::store::Store;
use postern::store::lists::ListKind;

#[derive(Parser)]
#[command(name = "postern", version, about = "Postern mail gateway")]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = "postern.toml")]
    config: PathBuf,
    /// Log format on stderr: `text`, or `json` (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Read a password on stdin, print its argon2id hash for policies/users.toml.
    Passwd,
    /// DKIM signing keys.
    Dkim {
        #[command(subcommand)]
        cmd: DkimCmd,
    },
    /// The commands that read the configuration.
    #[command(flatten)]
    WithConfig(ConfigCommand),
}

#[derive(Subcommand)]
enum DkimCmd {
    /// Write a new signing key (PEM, mode 0600) and print the DNS TXT record.
    Keygen {
        /// The signing domain (d=), e.g. example.test.
        #[arg(long)]
        domain: String,
        /// The selector (s=): the record goes at SELECTOR._domainkey.DOMAIN.
        #[arg(long)]
        selector: String,
        #[arg(long, value_enum, default_value_t = KeyAlgorithm::Rsa)]
        algorithm: KeyAlgorithm,
        /// Where to write the key (default dkim/DOMAIN.SELECTOR.pem); never over an existing file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KeyAlgorithm {
    /// RSA-SHA256, 2048 bits (read by every verifier).
    Rsa,
    /// Ed25519-SHA256 (RFC 8463; not every verifier reads it yet: sign with both).
    Ed25519,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Run all listeners and workers until SIGTERM/SIGINT.
    Serve,
    /// Validate the configuration; print each problem with file and line.
    Check,
    /// Queue administration.
    Queue {
        #[command(subcommand)]
        cmd: QueueCmd,
    },
    /// Quarantine administration.
    Quarantine {
        #[command(subcommand)]
        cmd: QuarantineCmd,
    },
    /// Rule tools.
    Rules {
        #[command(subcommand)]
        cmd: RulesCmd,
    },
    /// Sender allow and block lists, site-wide or (with --user) per user.
    Lists {
        #[command(subcommand)]
        list: ListsCmd,
    },
}

#[derive(Subcommand)]
enum ListsCmd {
    /// Senders whose mail skips the spam checks (never the virus or
    /// attachment checks).
    Allow {
        #[command(subcommand)]
        action: ListAction,
    },
    /// Senders whose mail is quarantined (or refused: rules/05-lists.rhai).
    Block {
        #[command(subcommand)]
        action: ListAction,
    },
}

#[derive(Subcommand)]
enum ListAction {
    /// Put an address or @domain on the list (off the other list).
    Add {
        /// A login from policies/users.toml: that user's list, not the site's.
        #[arg(long)]
        user: Option<String>,
        /// user@domain (case and +tag do not matter), or @domain (that domain only).
        entry: String,
    },
    /// Take an address or @domain off the list.
    Remove {
        #[arg(long)]
        user: Option<String>,
        entry: String,
    },
    /// Print the list, or (given an entry) whether it is on it.
    Show {
        #[arg(long)]
        user: Option<String>,
        entry: Option<String>,
    },
}

#[derive(Subcommand)]
enum RulesCmd {
    /// Run the whole rule set on a message offline and print what it
    /// decided, or run a rule suite (`--suite DIR`).
    Test {
        /// The message (RFC 5322, as it would arrive after DATA).
        #[arg(long, required_unless_present = "suite", conflicts_with = "suite")]
        message: Option<PathBuf>,
        /// Run every `DIR/*.toml` case (SPEC "Rule suites"); exit 1 on any mismatch.
        #[arg(long)]
        suite: Option<PathBuf>,
        /// Envelope sender (default: the null sender <>).
        #[arg(long, default_value = "")]
        from: String,
        /// Envelope recipient; repeat for several.
        #[arg(long)]
        rcpt: Vec<String>,
        /// The client's IP address.
        #[arg(long, default_value = "127.0.0.1")]
        ip: std::net::IpAddr,
        /// The client's HELO name.
        #[arg(long, default_value = "localhost")]
        helo: String,
    },
    /// Run the running rules and the candidate DIR over a corpus; print the
    /// verdict counts of each, every changed verdict, and per-script time.
    #[command(group(clap::ArgGroup::new("corpus").required(true).multiple(false)))]
    Replay {
        /// The candidate rules directory.
        #[arg(long)]
        rules: PathBuf,
        /// A Maildir (cur/ and new/, and its Maildir++ folders).
        #[arg(long, group = "corpus")]
        maildir: Option<PathBuf>,
        /// An mbox file (mboxrd).
        #[arg(long, group = "corpus")]
        mbox: Option<PathBuf>,
        /// The copies `[rules] keep_recent` kept of the mail received this
        /// long ago or later (e.g. 24h).
        #[arg(long, group = "corpus", value_parser = humantime::parse_duration)]
        recent: Option<std::time::Duration>,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
}

#[derive(Args, Clone)]
struct FilterArgs {
    /// Only messages whose sender contains this.
    #[arg(long)]
    sender: Option<String>,
    /// Only messages with a recipient containing this.
    #[arg(long)]
    rcpt: Option<String>,
    /// Only messages from or to this domain.
    #[arg(long)]
    domain: Option<String>,
    /// Only messages in this state (queued, deferred, held).
    #[arg(long)]
    state: Option<String>,
}

impl From<FilterArgs> for Filter {
    fn from(a: FilterArgs) -> Filter {
        Filter {
            sender: a.sender,
            rcpt: a.rcpt,
            domain: a.domain,
            state: a.state,
        }
    }
}

#[derive(Subcommand)]
enum QueueCmd {
    /// List queued messages.
    List(FilterArgs),
    /// Show one message: envelope, per-recipient status, headers.
    Show { id: String },
    /// Attempt delivery now.
    Retry { id: String },
    /// Delete a message without delivering or bouncing it.
    Delete { id: String },
    /// Stop delivering a message until released.
    Hold { id: String },
    /// Release a held message.
    Release { id: String },
}

#[derive(Subcommand)]
enum QuarantineCmd {
    /// List quarantined messages (one line per held recipient).
    List(FilterArgs),
    /// Show one held message.
    Show { id: String },
    /// Deliver a held message to its recipient.
    Release { id: String },
    /// Delete a held message.
    Delete { id: String },
    /// Send the quarantine digest now: to every user with held mail new to
    /// them, or to one.
    Digest {
        /// Only this user (a login from policies/users.toml).
        #[arg(long)]
        user: Option<String>,
        /// List all their held mail, not only what no digest has listed yet.
        #[arg(long)]
        now: bool,
    },
}

/// jemalloc with its background purging thread (the crate's `background_threads`
/// feature): freed pages go back to the kernel seconds after a burst of
/// connections or large messages, where glibc malloc kept its peak (issue 8).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `passwd` needs neither a configuration nor a runtime.
    let command = match cli.command {
        Command::Passwd => return passwd(),
        Command::Dkim {
            cmd:
                DkimCmd::Keygen {
                    domain,
                    selector,
                    algorithm,
                    out,
                },
        } => return dkim_keygen(&domain, &selector, algorithm, out),
        Command::WithConfig(c) => c,
    };
    // A replay runs every script on every message: per-message notes
    // (shadow verdicts) would drown its report.
    let quiet = matches!(
        command,
        ConfigCommand::Rules {
            cmd: RulesCmd::Replay { .. }
        }
    );
    let filter = tracing_subscriber::EnvFilter::try_from_env("POSTERN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if quiet { "warn" } else { "info" })
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        // One object per line: timestamp, level, message and the event's
        // fields at the top, the enclosing span's fields (session id,
        // listener, peer; or the delivery's queue id) under "span".
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("postern: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match command {
            ConfigCommand::Serve => match postern::gateway::serve(cfg).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("postern: {e:#}");
                    ExitCode::FAILURE
                }
            },
            ConfigCommand::Check => check(&cli.config, &cfg).await,
            ConfigCommand::Rules {
                cmd:
                    RulesCmd::Test {
                        message,
                        suite,
                        from,
                        rcpt,
                        ip,
                        helo,
                    },
            } => match (message, suite) {
                (_, Some(dir)) => postern::rules_test::suite(&cfg, &dir),
                (Some(message), None) => {
                    postern::rules_test::run(&cfg, &message, &from, &rcpt, ip, &helo).await
                }
                (None, None) => ExitCode::FAILURE,
            },
            ConfigCommand::Rules {
                cmd:
                    RulesCmd::Replay {
                        rules,
                        maildir,
                        mbox,
                        recent,
                        threads,
                    },
            } => {
                use postern::replay::{Corpus, Options};
                let corpus = match (maildir, mbox, recent) {
                    (Some(d), _, _) => Corpus::Maildir(d),
                    (_, Some(f), _) => Corpus::Mbox(f),
                    (_, _, Some(age)) => Corpus::Recent(age),
                    // clap requires one of the three.
                    _ => return ExitCode::FAILURE,
                };
                let opts = Options {
                    rules,
                    corpus,
                    threads,
                };
                postern::replay::run(&cfg, opts).await
            }
            ConfigCommand::Queue { cmd } => {
                admin_cmd(
                    &cfg,
                    match cmd {
                        QueueCmd::List(f) => Request::QueueList(f.into()),
                        QueueCmd::Show { id } => Request::QueueShow(id),
                        QueueCmd::Retry { id } => Request::QueueRetry(id),
                        QueueCmd::Delete { id } => Request::QueueDelete(id),
                        QueueCmd::Hold { id } => Request::QueueHold(id),
                        QueueCmd::Release { id } => Request::QueueRelease(id),
                    },
                )
                .await
            }
            ConfigCommand::Lists { list } => {
                let (kind, action) = match list {
                    ListsCmd::Allow { action } => (ListKind::Allow, action),
                    ListsCmd::Block { action } => (ListKind::Block, action),
                };
                let (user, entry, make): (_, _, fn(ListRequest) -> Request) = match action {
                    ListAction::Add { user, entry } => (user, Some(entry), Request::ListsAdd),
                    ListAction::Remove { user, entry } => (user, Some(entry), Request::ListsRemove),
                    ListAction::Show { user, entry } => (user, entry, Request::ListsShow),
                };
                let user = match user.map(|u| known_user(&cfg, &u)).transpose() {
                    Ok(u) => u,
                    Err(e) => {
                        eprintln!("postern: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                admin_cmd(
                    &cfg,
                    make(ListRequest {
                        list: kind,
                        user,
                        entry,
                    }),
                )
                .await
            }
            ConfigCommand::Quarantine { cmd } => {
                admin_cmd(
                    &cfg,
                    match cmd {
                        QuarantineCmd::List(f) => Request::QuarantineList(f.into()),
                        QuarantineCmd::Show { id } => Request::QuarantineShow(id),
                        QuarantineCmd::Release { id } => Request::QuarantineRelease(id),
                        QuarantineCmd::Delete { id } => Request::QuarantineDelete(id),
                        QuarantineCmd::Digest { user, now } => {
                            let user = match user.map(|u| known_user(&cfg, &u)).transpose() {
                                Ok(u) => u,
                                Err(e) => {
                                    eprintln!("postern: {e}");
                                    return ExitCode::FAILURE;
                                }
                            };
                            Request::QuarantineDigest { user, all: now }
                        }
                    },
                )
                .await
            }
        }
    })
}

/// `postern check`: every rule, policy and accounts problem (the config's
/// own were printed when it loaded), each on its own line; exit 1 if any.
async fn check(path: &std::path::Path, cfg: &Config) -> ExitCode {
    let policy = Policy::from_config(cfg);
    let accounts = Accounts::from_config(cfg);
    let signers = postern::dkim::Signers::load(cfg);
    let recipients = postern::verify::check(cfg);
    // `[cluster] redis` must answer (a short timeout): a node that cannot
    // reach it would count alone.
    let cluster = match postern::policy::check_cluster(cfg).await {
        None => Ok(None),
        Some(r) => r.map(Some),
    };
    match (policy, accounts, signers, recipients, cluster) {
        (Ok(p), Ok(_), Ok(_), Ok(listed), Ok(cluster)) => {
            // `serve` raises the soft limit to the hard one: warn against that.
            if let Ok((_, hard)) = postern::fds::limits()
                && let Some(w) = postern::fds::warning(cfg, hard)
            {
                eprintln!("warning: {w}");
            }
            let set = p.current();
            let cases = p.suite_cases();
            println!(
                "{}: ok ({} rule script(s), {} rate limit(s), {cases} rule suite case(s) passed)",
                path.display(),
                set.script_names().len(),
                set.limit_names().len()
            );
            if let Some(line) = listed {
                println!("{line}");
            }
            if let Some(line) = cluster {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        (policy, accounts, signers, recipients, cluster) => {
            for p in policy.err().into_iter().flatten() {
                eprintln!("{p}");
            }
            if let Err(e) = accounts {
                eprintln!("{e}");
            }
            for p in signers.err().into_iter().flatten() {
                eprintln!("{p}");
            }
            for p in recipients.err().into_iter().flatten() {
                eprintln!("{p}");
            }
            if let Err(why) = cluster {
                eprintln!("{}: {why}", path.display());
            }
            ExitCode::FAILURE
        }
    }
}

/// The login of `--user LOGIN` as users.toml spells it, or why not: the
/// file is read here, as the running gateway (re)reads it.
fn known_user(cfg: &Config, login: &str) -> Result<String, String> {
    let accounts = Accounts::from_config(cfg).map_err(|e| e.to_string())?;
    accounts
        .find_login(login)
        .map(str::to_string)
        .ok_or_else(|| {
            format!(
                "no user \"{login}\" in {} (--user takes a login from it)",
                Accounts::file(cfg).display()
            )
        })
}

/// Ask the running gateway, or open the store when none runs.
async fn admin_cmd(cfg: &Config, req: Request) -> ExitCode {
    let data_dir = &cfg.server.data_dir;
    let resp = match admin::send_control(&admin::socket_path(data_dir), &req).await {
        Some(r) => r,
        None => {
            let path = data_dir.join("store");
            if !path.exists() {
                eprintln!(
                    "postern: no store at {} (has `postern serve` ever run with this config?)",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
            match Store::open(&path) {
                Ok(store) => {
                    let r = admin::execute_offline(cfg, &store, req).await;
                    let _ = store.flush();
                    r
                }
                Err(e) => {
                    eprintln!("postern: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    if resp.ok {
        print!("{}", resp.output);
        ExitCode::SUCCESS
    } else {
        eprintln!("postern: {}", resp.output.trim_end());
        ExitCode::FAILURE
    }
}

/// `postern dkim keygen`: the key file, then the record to publish.
fn dkim_keygen(
    domain: &str,
    selector: &str,
    algorithm: KeyAlgorithm,
    out: Option<PathBuf>,
) -> ExitCode {
    use postern::dkim;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    if domain.is_empty() || !domain.contains('.') || domain.contains(['@', ' ', '/']) {
        eprintln!("postern: \"{domain}\" is not a domain name");
        return ExitCode::FAILURE;
    }
    if selector.is_empty()
        || !selector
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        eprintln!("postern: \"{selector}\" is not a DNS label");
        return ExitCode::FAILURE;
    }
    let out = out.unwrap_or_else(|| dkim::default_key_path(&domain, selector));
    let alg = match algorithm {
        KeyAlgorithm::Rsa => dkim::Algorithm::Rsa,
        KeyAlgorithm::Ed25519 => dkim::Algorithm::Ed25519,
    };
    match dkim::keygen(&domain, selector, alg, &out) {
        Ok((name, strings)) => {
            eprintln!("postern: wrote {} (mode 0600)", out.display());
            let quoted: Vec<String> = strings.iter().map(|s| format!("\"{s}\"")).collect();
            println!("{name}. IN TXT ( {} )", quoted.join(" "));
            eprintln!(
                "postern: publish that record, then add to postern.toml:\n[[dkim_sign]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nkey = \"{}\"",
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("postern: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `postern passwd`: one line from stdin (no echo handling: pipe it, or type
/// it into a terminal you trust), its argon2id hash on stdout.
fn passwd() -> ExitCode {
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() {
        eprintln!("postern: cannot read the password from stdin");
        return ExitCode::FAILURE;
    }
    let pw = line.trim_end_matches(['\r', '\n']);
    if pw.is_empty() {
        eprintln!("postern: empty password");
        return ExitCode::FAILURE;
    }
    println!("{}", postern::mailbox::accounts::hash_password(pw));
    ExitCode::SUCCESS
}
