//! The Admin API on a real PostgreSQL server shared by two meshgate instances: a change made
//! through either one serves on both within a second, concurrent writers through both lose
//! nothing, and the database password never reaches a log.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Echo, KongNode, admin_call, free_port, raw_get, raw_request, scratch_dir};

const PASSWORD: &str = "pg-s3cret-for-tests";

/// A private PostgreSQL cluster (initdb + postgres) on a free loopback port, with password
/// authentication; stopped and removed on drop. As root it runs as the `postgres` user, since
/// PostgreSQL refuses to run as root.
struct PostgresServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

fn postgres_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/test installs the `postgresql` package)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin").join(name)))
        .filter(|p| p.exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("a PostgreSQL server binary under /usr/lib/postgresql/*/bin")
}

fn as_postgres_user(program: PathBuf) -> Command {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if is_root {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

impl PostgresServer {
    fn start() -> PostgresServer {
        let dir = std::env::temp_dir().join(format!("meshgate-pg-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("pg dir");
        let data = dir.join("data");
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, PASSWORD).expect("pwfile");
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status();
        let out = as_postgres_user(postgres_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "meshgate", "-A", "scram-sha-256", "--pwfile"])
            .arg(&pwfile)
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let child = as_postgres_user(postgres_bin("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        let server = PostgresServer { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "postgres did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Accepting TCP is not yet accepting logins; give start-up recovery a moment.
        std::thread::sleep(Duration::from_millis(300));
        server
    }

    fn url(&self) -> String {
        format!("postgres://meshgate:{PASSWORD}@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // SIGTERM for a smart shutdown would also do; the cluster is thrown away.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn call(admin: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    admin_call(admin, method, path, "application/json", body, None)
}

fn instance(database: &str) -> KongNode {
    KongNode::start(database, false)
}

/// Polls until `check` holds; returns how long it took, or panics after `limit`.
fn within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_instances_on_one_postgres_see_each_others_changes_within_a_second() {
    let pg = PostgresServer::start();
    let app = Echo::start("pg-app");
    let a = instance(&pg.url());
    let b = instance(&pg.url());
    assert_eq!(call(a.admin, "GET", "/", "").1["configuration"]["database"], "postgres");

    // Created through A: serves on A at once, and on B within a second.
    let (status, body) = call(
        a.admin,
        "POST",
        "/services",
        &format!(r#"{{"name": "app", "url": "http://127.0.0.1:{}"}}"#, app.port()),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = call(
        a.admin,
        "POST",
        "/services/app/routes",
        r#"{"name": "r", "paths": ["/app"]}"#,
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(raw_get(a.gateway, "/app", "x").expect("A").0, 200);
    let took = within(Duration::from_secs(1), "B serves A's route", || {
        raw_get(b.gateway, "/app", "x").is_ok_and(|r| r.0 == 200)
    });
    eprintln!("B served A's route after {took:?}");

    // A plugin and a credential created through B are enforced by A within a second.
    assert_eq!(call(b.admin, "POST", "/consumers", r#"{"username": "alice"}"#).0, 201);
    assert_eq!(
        call(b.admin, "POST", "/consumers/alice/key-auth", r#"{"key": "alice-key"}"#).0,
        201
    );
    assert_eq!(call(b.admin, "POST", "/plugins", r#"{"name": "key-auth"}"#).0, 201);
    within(Duration::from_secs(1), "A enforces B's key-auth", || {
        raw_get(a.gateway, "/app", "x").is_ok_and(|r| r.0 == 401)
    });
    let with_key = "GET /app HTTP/1.1\r\nHost: x\r\napikey: alice-key\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_request(a.gateway, with_key).expect("A with key").0, 200);
    assert_eq!(call(a.admin, "GET", "/consumers/alice", "").1["username"], "alice");

    // Writers on both instances at once: every entity is kept (no lost update).
    let writers: Vec<_> = [(a.admin, "a"), (b.admin, "b")]
        .into_iter()
        .map(|(admin, prefix)| {
            std::thread::spawn(move || {
                for i in 0..8 {
                    let (status, body) = call(
                        admin,
                        "POST",
                        "/upstreams",
                        &format!(r#"{{"name": "{prefix}-{i}.upstream"}}"#),
                    );
                    assert_eq!(status, 201, "{body}");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    let listed = call(a.admin, "GET", "/upstreams", "").1;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(16), "{listed}");

    // The password is never logged, though the database is named in the logs.
    for instance in [&a, &b] {
        let log = instance.proxy.log_text();
        assert!(!log.contains(PASSWORD), "password in log:\n{log}");
        assert!(log.contains("postgres://meshgate:***@127.0.0.1"), "{log}");
    }
}

#[test]
fn an_unreachable_postgres_is_a_clear_start_up_error() {
    let dir = scratch_dir("pg-down");
    let config = dir.join("config.yaml");
    std::fs::write(&config, "").expect("write");
    let port = free_port(); // nothing listens here
    let out = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["proxy", "--config"])
        .arg(&config)
        .args(["--admin-addr", "127.0.0.1:0", "--admin-api", "127.0.0.1:0"])
        .arg("--admin-api-database")
        .arg(format!("postgres://meshgate:{PASSWORD}@127.0.0.1:{port}/postgres"))
        .output()
        .expect("run meshgate");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("postgres://meshgate:***@127.0.0.1:{port}/postgres")),
        "{stderr}"
    );
    assert!(!stderr.contains(PASSWORD), "{stderr}");
}
