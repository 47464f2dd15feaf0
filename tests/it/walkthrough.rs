//! README command one and its walk-through, run as written: the real binary started with no
//! configuration in an empty directory, the credentials it wrote sourced into the README's shell
//! block, and the CLI provisioning commands.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

/// Kills the service when the test ends, however it ends.
pub(crate) struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn issuer(dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_issuer"));
    cmd.current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("ISSUER_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    // Only the port differs from command one, so parallel tests do not collide on :8080.
    cmd.env("ISSUER_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("ISSUER_PUBLIC_URL", format!("http://127.0.0.1:{port}"))
        .env("ISSUER_METRICS_ADDR", "127.0.0.1:0");
    cmd
}

/// Starts the service and collects stdout until it logs that it serves.
fn start(dir: &Path, port: u16) -> (Service, Vec<String>) {
    let (service, lines, _rest) = start_with(issuer(dir, port));
    (service, lines)
}

/// Starts `cmd` and collects stdout until the service logs that it serves; the receiver yields
/// the lines after that.
pub(crate) fn start_with(mut cmd: Command) -> (Service, Vec<String>, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let service = Service(child);
    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the service starts and says so");
        let serving = line.contains("serving REST and gRPC");
        lines.push(line);
        if serving {
            return (service, lines, rx);
        }
    }
}

fn exports(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The fenced block after the `<!-- walkthrough` marker in README.md.
fn readme_walkthrough() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let after = &readme[readme
        .find("<!-- walkthrough")
        .expect("README marks its walk-through")..];
    let start = after.find("```sh\n").unwrap() + "```sh\n".len();
    let end = after[start..].find("\n```").unwrap();
    after[start..start + end].to_owned()
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    serde_json::from_str(line).unwrap()
}

fn token_status(port: u16, client_id: &str, secret: &str) -> u16 {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-u",
            &format!("{client_id}:{secret}"),
        ])
        .args(["-d", "grant_type=client_credentials"])
        .arg(format!("http://127.0.0.1:{port}/issuer/oauth/token"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).parse().unwrap()
}

#[test]
fn command_one_and_the_readme_walkthrough_work_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (service, lines) = start(dir.path(), port);
    // Not a terminal: nothing secret on stdout (where a container's logs go), only where the
    // credentials file is.
    assert!(exports(&lines).is_empty(), "{lines:?}");
    assert!(
        !lines.iter().any(|l| l.contains("cs_")),
        "no client secret on stdout: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("bootstrap-credentials.env")),
        "{lines:?}"
    );
    let data = dir.path().join("data");
    let file = std::fs::read_to_string(data.join("bootstrap-credentials.env")).unwrap();
    let env = exports(&file.lines().map(str::to_owned).collect::<Vec<_>>());
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "ISSUER_URL",
            "ISSUER_TENANT_ID",
            "ISSUER_CLIENT_ID",
            "ISSUER_CLIENT_SECRET"
        ],
        "first start prints the bootstrap credentials"
    );
    assert!(
        dir.path().join("data/issuer.db").exists(),
        "embedded SQLite in ./data"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700, "the data dir is the service's only");
        for entry in std::fs::read_dir(&data).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                assert_eq!(mode(&path), 0o600, "{}", path.display());
            }
        }
    }

    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &readme_walkthrough()])
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walk-through failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(r#""status": "pending""#), "{stdout}");
    assert!(
        stdout.contains(r#""pre-authorized_code""#),
        "the offer JSON is shown: {stdout}"
    );
    assert!(
        stdout.contains(r#""code": "invalid_state""#),
        "revoking before a wallet took the credential is refused as the README says: {stdout}"
    );

    // CLI provisioning against the same data directory while the service runs.
    let tenant = json_of(
        &issuer(dir.path(), port)
            .args(["tenant", "create", "--name", "Acme", "--output", "json"])
            .output()
            .unwrap(),
    );
    let tenant_id = tenant["tenant_id"].as_str().unwrap().to_owned();
    let client = json_of(
        &issuer(dir.path(), port)
            .args(["client", "create", "--tenant", &tenant_id])
            .args([
                "--scopes",
                "issuance:write,issuance:read",
                "--output",
                "json",
            ])
            .output()
            .unwrap(),
    );
    let client_id = client["client_id"].as_str().unwrap().to_owned();
    let old_secret = client["client_secret"].as_str().unwrap().to_owned();
    assert_eq!(token_status(port, &client_id, &old_secret), 200);

    let rotated = json_of(
        &issuer(dir.path(), port)
            .args([
                "client",
                "rotate-secret",
                "--tenant",
                &tenant_id,
                "--client",
                &client_id,
            ])
            .args(["--output", "json"])
            .output()
            .unwrap(),
    );
    let new_secret = rotated["client_secret"].as_str().unwrap();
    assert_ne!(new_secret, old_secret);
    assert_eq!(
        token_status(port, &client_id, &old_secret),
        401,
        "the old secret stops working"
    );
    assert_eq!(token_status(port, &client_id, new_secret), 200);

    // Unknown scopes are refused by the CLI before anything is written.
    let bad = issuer(dir.path(), port)
        .args([
            "client", "create", "--tenant", &tenant_id, "--scopes", "admin",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    // A second start of the same data directory prints no credentials again.
    drop(service);
    let (_service, lines) = start(dir.path(), port);
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("bootstrap-credentials.env")),
        "credentials are made only on the first start: {lines:?}"
    );
}
