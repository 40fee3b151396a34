//! DKIM signing: keys made by `postern dkim keygen`, mail of our own signed
//! on the way through, and the signature checked by an independent
//! verifier (PyPI's dkimpy) against the loopback DNS that serves the
//! records keygen printed.

use std::time::Duration;

use crate::common::*;
use crate::dns::start_dns;

/// `postern dkim keygen`: the key file and the TXT record (name, value).
fn keygen(dir: &std::path::Path, domain: &str, selector: &str, alg: &str) -> (String, String) {
    let out = dir.join(format!("{domain}.{selector}.pem"));
    let run = std::process::Command::new(BIN)
        .args(["dkim", "keygen", "--domain", domain, "--selector", selector])
        .args(["--algorithm", alg, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // `NAME. IN TXT ( "part" "part" )`
    let (name, rest) = stdout.split_once(". IN TXT ( ").expect("record line");
    let value: String = rest
        .trim_end()
        .trim_end_matches(')')
        .split('"')
        .skip(1)
        .step_by(2)
        .collect();
    assert!(
        rest.split('"').skip(1).step_by(2).all(|s| s.len() <= 255),
        "TXT strings over 255 bytes: {rest}"
    );
    (name.to_string(), value)
}

const VERIFY: &str = r#"
import sys
try:
    import dkim, dns.resolver
except ImportError as e:
    print('SKIP', e); sys.exit(0)
port, path = int(sys.argv[1]), sys.argv[2]
r = dns.resolver.Resolver(configure=False)
r.nameservers = ['127.0.0.1']; r.port = port
def txt(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    try:
        answer = r.resolve(name.rstrip('.'), 'TXT', lifetime=timeout)
    except Exception:
        return None
    return b''.join(b''.join(rd.strings) for rd in answer)
msg = open(path, 'rb').read()
print('verified', dkim.verify(msg, dnsfunc=txt))
"#;

const OUTSIDE: &str = r#"
import smtplib, sys
port = int(sys.argv[1])
msg = "From: <a@local.test>\r\nTo: <bob@local.test>\r\nSubject: from outside\r\n\r\nforged\r\n"
with smtplib.SMTP('127.0.0.1', port, source_address=('127.0.0.2', 0), timeout=10) as s:
    s.sendmail('a@local.test', ['bob@local.test'], msg)
print('sent')
"#;

#[tokio::test(flavor = "multi_thread")]
async fn our_mail_is_signed_rsa_and_ed25519_and_dkimpy_verifies_it() {
    let keys = tempfile::tempdir().unwrap();
    let (rsa_name, rsa_txt) = keygen(keys.path(), "local.test", "rsa1", "rsa");
    let (ed_name, ed_txt) = keygen(keys.path(), "ed.test", "ed1", "ed25519");
    assert_eq!(rsa_name, "rsa1._domainkey.local.test");
    assert!(rsa_txt.starts_with("v=DKIM1; k=rsa; p=MII"), "{rsa_txt}");
    assert!(ed_txt.starts_with("v=DKIM1; k=ed25519; p="), "{ed_txt}");
    let dns = start_dns(&[(&rsa_name, &rsa_txt), (&ed_name, &ed_txt)]).await;

    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts {
        networks: vec!["127.0.0.1/32".into()],
        extra: format!(
            "[[dkim_sign]]\ndomain = \"local.test\"\nselector = \"rsa1\"\nkey = \"{}\"\n\
             [[dkim_sign]]\ndomain = \"ed.test\"\nselector = \"ed1\"\nkey = \"{}\"\n",
            keys.path().join("local.test.rsa1.pem").display(),
            keys.path().join("ed.test.ed1.pem").display()
        ),
        ..Opts::sink(sink.port)
    })
    .await;
    let (ok, out, err) = gw.admin(&["check"]);
    assert!(ok, "postern check: {out}{err}");

    // From a trusted network: signed with the key of the From domain.
    for (from, to) in [
        ("alice@local.test", "friend@far.test"),
        ("bob@ed.test", "friend@far.test"),
        ("carol@unsigned.test", "friend@far.test"),
    ] {
        let mut c = Client::connect(gw.smtp).await;
        c.cmd("EHLO inside.test").await;
        let data = format!(
            "From: Someone <{from}>\r\nTo: <{to}>\r\nSubject: signed?\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{from}.1@x>\r\n\r\nHello,\r\n\r\n.a line that is dot-stuffed on the wire\r\nbye\r\n"
        );
        let r = c.mail(from, &[to], data.as_bytes()).await;
        assert!(r.starts_with("250"), "{r}");
        c.cmd("QUIT").await;
    }
    // And one from outside claiming our domain: never signed.
    let smtp = gw.smtp.to_string();
    let out = tokio::task::spawn_blocking(move || python(OUTSIDE, &[&smtp]))
        .await
        .unwrap();
    assert!(out.contains("sent"), "{out}");
    assert!(eventually(Duration::from_secs(10), || sink.count() == 4).await);

    let got = sink.messages();
    let by_from = |from: &str| {
        got.iter()
            .find(|g| g.from == from && g.rcpts != ["bob@local.test"])
            .unwrap_or_else(|| panic!("nothing from {from}"))
            .body
            .clone()
    };
    let dir = tempfile::tempdir().unwrap();
    for (from, domain, alg) in [
        ("alice@local.test", "local.test", "rsa-sha256"),
        ("bob@ed.test", "ed.test", "ed25519-sha256"),
    ] {
        let body = by_from(from);
        let text = String::from_utf8_lossy(&body).into_owned();
        let sig = text
            .split("\r\n\r\n")
            .next()
            .unwrap()
            .split("\r\n")
            .find(|l| l.starts_with("DKIM-Signature:"))
            .unwrap_or_else(|| panic!("{from} not signed:\n{text}"));
        assert!(sig.contains(&format!("a={alg}")), "{sig}");
        assert!(text.contains(&format!("d={domain}")), "{text}");
        assert!(text.contains("c=relaxed/relaxed"), "{text}");
        let path = dir.path().join(format!("{domain}.eml"));
        std::fs::write(&path, &body).unwrap();
        let (port, p) = (dns.port().to_string(), path.display().to_string());
        let out = tokio::task::spawn_blocking(move || python(VERIFY, &[&port, &p]))
            .await
            .unwrap();
        if out.starts_with("SKIP") {
            eprintln!("skipping the dkimpy check: {out} (pip install dkimpy dnspython pynacl)");
            continue;
        }
        assert!(
            out.contains("verified True"),
            "dkimpy on {from}: {out}\n{text}"
        );
        // A changed body breaks it: the verifier is really checking.
        let tampered = text.replace("bye", "BYE");
        std::fs::write(&path, tampered).unwrap();
        let (port, p) = (dns.port().to_string(), path.display().to_string());
        let out = tokio::task::spawn_blocking(move || python(VERIFY, &[&port, &p]))
            .await
            .unwrap();
        assert!(out.contains("verified False"), "tampered {from}: {out}");
    }
    let plain = String::from_utf8_lossy(&by_from("carol@unsigned.test")).into_owned();
    assert!(!plain.contains("DKIM-Signature"), "{plain}");
    let outside = got
        .iter()
        .find(|g| g.rcpts == ["bob@local.test"])
        .expect("the outside message");
    assert!(
        !String::from_utf8_lossy(&outside.body).contains("DKIM-Signature"),
        "mail from outside was signed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_signing_key_fails_check_and_start_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("broken.pem");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    for sub in ["rules", "policies"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    std::fs::write(dir.path().join("policies/ratelimits.toml"), "").unwrap();
    std::fs::write(dir.path().join("policies/users.toml"), "").unwrap();
    let cfg = dir.path().join("postern.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nhostname = \"gw.test\"\ndata_dir = \"data\"\n[smtp]\nrelay = []\nsubmission = []\nsubmissions = []\n[quarantine]\npop3 = []\npop3s = []\nimap = []\nimaps = []\n[dkim_sign]\ndomain = \"local.test\"\nselector = \"s\"\nkey = \"{}\"\n",
            key.display()
        ),
    )
    .unwrap();
    for cmd in ["check", "serve"] {
        let out = std::process::Command::new(BIN)
            .args([cmd, "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd} accepted a broken key");
        assert!(
            err.contains("broken.pem") && err.contains("[dkim_sign] key"),
            "{cmd}: {err}"
        );
    }
}
