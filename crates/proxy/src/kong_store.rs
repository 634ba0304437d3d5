//! The Admin API's database: an embedded SQLite file by default, or PostgreSQL when given a
//! URL (Kong's own choice of shared store, so several meshgate instances can share one state).
//!
//! The state is one decK document in one row, with a revision number. The document is the
//! unit meshgate validates (a change is accepted only when the whole config still compiles),
//! so it is also the unit stored: every change runs under the row's write lock (SQLite
//! `BEGIN IMMEDIATE`, PostgreSQL `SELECT ... FOR UPDATE`) on the latest document, and bumps
//! the revision. Instances learn of each other's changes by polling the revision.

use std::fmt;
use std::path::PathBuf;

use serde_json::{Value, json};

/// The table holding the state; one row, `id = 1`.
const TABLE: &str = "meshgate_admin_state";

/// Where the state lives, as given to `--admin-api-database`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite database file (created when missing).
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://user:password@host:port/dbname`).
    Postgres(String),
}

impl StoreLocation {
    /// `postgres://` and `postgresql://` URLs name PostgreSQL; anything else is a SQLite file
    /// path, with an optional `sqlite:` prefix.
    pub fn parse(text: &str) -> StoreLocation {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            StoreLocation::Postgres(text.to_string())
        } else {
            StoreLocation::Sqlite(PathBuf::from(text.strip_prefix("sqlite:").unwrap_or(text)))
        }
    }

    /// Kong's name for the database kind (`GET /` reports it).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreLocation::Sqlite(_) => "sqlite",
            StoreLocation::Postgres(_) => "postgres",
        }
    }
}

impl fmt::Display for StoreLocation {
    /// Never prints a PostgreSQL password: the location appears in logs and errors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            StoreLocation::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => {
            // Key-value form in the query (`?password=...`) is redacted too.
            if tail.contains("password=") {
                format!("{scheme}://{authority}?***")
            } else {
                url.to_string()
            }
        }
    }
}

/// The stored document and its revision (0 for a store nobody has written yet).
#[derive(Debug, Clone)]
pub struct Stored {
    pub revision: i64,
    pub document: Value,
}

/// What a change decided: the document to store (`None`: leave the state alone), and the
/// answer for whoever asked.
pub struct Change<T> {
    pub write: Option<Value>,
    pub answer: T,
}

pub struct Store {
    location: StoreLocation,
    backend: Backend,
}

enum Backend {
    Sqlite(std::sync::Mutex<rusqlite::Connection>),
    /// Connected lazily and again after the connection drops.
    Postgres(tokio::sync::Mutex<Option<tokio_postgres::Client>>),
}

fn empty_document() -> Value {
    json!({"_format_version": "3.0"})
}

fn parse_document(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("the stored state is not JSON: {e}"))
}

impl Store {
    /// Opens the database and creates the table when missing.
    pub async fn open(location: StoreLocation) -> Result<Store, String> {
        let backend = match &location {
            StoreLocation::Sqlite(path) => {
                // The state holds credentials and private keys: readable by its owner only.
                // (SQLite gives its -wal and -shm files the database's permissions.)
                if !path.exists() {
                    use std::os::unix::fs::OpenOptionsExt;
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(path)
                        .map_err(|e| format!("{location}: {e}"))?;
                }
                let conn = rusqlite::Connection::open(path).map_err(|e| format!("{location}: {e}"))?;
                // Another process (`meshgate config import`) may hold the write lock briefly.
                conn.busy_timeout(std::time::Duration::from_secs(5))
                    .map_err(|e| format!("{location}: {e}"))?;
                conn.execute_batch(&format!(
                    "PRAGMA journal_mode = WAL;
                     CREATE TABLE IF NOT EXISTS {TABLE} (
                         id INTEGER PRIMARY KEY CHECK (id = 1),
                         revision INTEGER NOT NULL,
                         document TEXT NOT NULL);"
                ))
                .map_err(|e| format!("{location}: {e}"))?;
                Backend::Sqlite(std::sync::Mutex::new(conn))
            }
            StoreLocation::Postgres(_) => Backend::Postgres(tokio::sync::Mutex::new(None)),
        };
        let store = Store { location, backend };
        if let Backend::Postgres(client) = &store.backend {
            let mut guard = client.lock().await;
            let client = store.pg_client(&mut guard).await?;
            // Two instances starting at once may race on CREATE TABLE; the loser's error is
            // harmless once the table exists.
            let create = format!(
                "CREATE TABLE IF NOT EXISTS {TABLE} (
                     id INTEGER PRIMARY KEY CHECK (id = 1),
                     revision BIGINT NOT NULL,
                     document TEXT NOT NULL)"
            );
            if let Err(first) = client.batch_execute(&create).await {
                client
                    .batch_execute(&create)
                    .await
                    .map_err(|_| format!("{}: {}", store.location, pg_error(&first)))?;
            }
        }
        Ok(store)
    }

    pub fn location(&self) -> &StoreLocation {
        &self.location
    }

    /// Connects (again) when there is no live connection.
    async fn pg_client<'a>(
        &self,
        slot: &'a mut Option<tokio_postgres::Client>,
    ) -> Result<&'a mut tokio_postgres::Client, String> {
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            let StoreLocation::Postgres(url) = &self.location else {
                return Err("not a PostgreSQL store".to_string());
            };
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("{}: {}", self.location, pg_error(&e)))?;
            let location = self.location.to_string();
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(database = %location, error = %pg_error(&e), "Admin API database connection lost");
                }
            });
            *slot = Some(client);
        }
        slot.as_mut().ok_or_else(|| "no database connection".to_string())
    }

    /// The latest state.
    pub async fn load(&self) -> Result<Stored, String> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                sqlite_read(&conn).map_err(|e| format!("{}: {e}", self.location))
            }
            Backend::Postgres(client) => {
                let mut guard = client.lock().await;
                let client = self.pg_client(&mut guard).await?;
                let row = client
                    .query_opt(&format!("SELECT revision, document FROM {TABLE} WHERE id = 1"), &[])
                    .await
                    .map_err(|e| format!("{}: {}", self.location, pg_error(&e)))?;
                match row {
                    Some(row) => Ok(Stored {
                        revision: row.get(0),
                        document: parse_document(row.get(1))?,
                    }),
                    None => Ok(Stored {
                        revision: 0,
                        document: empty_document(),
                    }),
                }
            }
        }
    }

    /// The current revision only: cheap enough to poll.
    pub async fn revision(&self) -> Result<i64, String> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                conn.query_row(&format!("SELECT revision FROM {TABLE} WHERE id = 1"), [], |r| r.get(0))
                    .or_else(|e| match e {
                        rusqlite::Error::QueryReturnedNoRows => Ok(0),
                        e => Err(format!("{}: {e}", self.location)),
                    })
            }
            Backend::Postgres(client) => {
                let mut guard = client.lock().await;
                let client = self.pg_client(&mut guard).await?;
                let row = client
                    .query_opt(&format!("SELECT revision FROM {TABLE} WHERE id = 1"), &[])
                    .await
                    .map_err(|e| format!("{}: {}", self.location, pg_error(&e)))?;
                Ok(row.map_or(0, |r| r.get(0)))
            }
        }
    }

    /// Runs `change` on the latest document while holding the state's write lock, so that
    /// concurrent writers (in this process or another sharing the database) never lose each
    /// other's changes; stores what it decides with the next revision. Returns the new state
    /// (`None` when nothing was written) with the change's answer.
    pub async fn update<T>(&self, change: impl FnOnce(Stored) -> Change<T>) -> Result<(Option<Stored>, T), String> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(|e| format!("{}: {e}", self.location))?;
                let current = sqlite_read(&tx).map_err(|e| format!("{}: {e}", self.location))?;
                let revision = current.revision + 1;
                let Change { write, answer } = change(current);
                let Some(document) = write else {
                    return Ok((None, answer));
                };
                tx.execute(
                    &format!(
                        "INSERT INTO {TABLE} (id, revision, document) VALUES (1, ?1, ?2)
                         ON CONFLICT (id) DO UPDATE SET revision = excluded.revision, document = excluded.document"
                    ),
                    rusqlite::params![revision, document.to_string()],
                )
                .and_then(|_| tx.commit())
                .map_err(|e| format!("{}: {e}", self.location))?;
                Ok((Some(Stored { revision, document }), answer))
            }
            Backend::Postgres(client) => {
                let mut guard = client.lock().await;
                let client = self.pg_client(&mut guard).await?;
                let err = |e: tokio_postgres::Error| format!("{}: {}", self.location, pg_error(&e));
                let tx = client.transaction().await.map_err(err)?;
                // Make sure the row exists, then lock it for the rest of the transaction.
                tx.execute(
                    &format!(
                        "INSERT INTO {TABLE} (id, revision, document) VALUES (1, 0, $1)
                         ON CONFLICT (id) DO NOTHING"
                    ),
                    &[&empty_document().to_string()],
                )
                .await
                .map_err(err)?;
                let row = tx
                    .query_one(
                        &format!("SELECT revision, document FROM {TABLE} WHERE id = 1 FOR UPDATE"),
                        &[],
                    )
                    .await
                    .map_err(err)?;
                let current = Stored {
                    revision: row.get(0),
                    document: parse_document(row.get(1))?,
                };
                let revision = current.revision + 1;
                let Change { write, answer } = change(current);
                let Some(document) = write else {
                    tx.rollback().await.map_err(err)?;
                    return Ok((None, answer));
                };
                tx.execute(
                    &format!("UPDATE {TABLE} SET revision = $1, document = $2 WHERE id = 1"),
                    &[&revision, &document.to_string()],
                )
                .await
                .map_err(err)?;
                tx.commit().await.map_err(err)?;
                Ok((Some(Stored { revision, document }), answer))
            }
        }
    }
}

fn sqlite_read(conn: &rusqlite::Connection) -> Result<Stored, String> {
    let row = conn.query_row(
        &format!("SELECT revision, document FROM {TABLE} WHERE id = 1"),
        [],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
    );
    match row {
        Ok((revision, text)) => Ok(Stored {
            revision,
            document: parse_document(&text)?,
        }),
        Err(rusqlite::Error::QueryReturnedNoRows) => Ok(Stored {
            revision: 0,
            document: empty_document(),
        }),
        Err(e) => Err(e.to_string()),
    }
}

/// PostgreSQL's own message (with its code) rather than tokio-postgres's generic "db error".
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_passwords_never_reach_the_display_form() {
        let shown = StoreLocation::parse("postgres://kong:s3cret@db:5432/kong").to_string();
        assert_eq!(shown, "postgres://kong:***@db:5432/kong");
        let shown = StoreLocation::parse("postgresql://db/kong?user=kong&password=s3cret").to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(
            StoreLocation::parse("sqlite:/var/lib/mg.db"),
            StoreLocation::Sqlite(PathBuf::from("/var/lib/mg.db"))
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sqlite_updates_are_kept_across_opens_and_revisions_grow() {
        let dir = std::env::temp_dir().join(format!("meshgate-store-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("state.db");
        let _ = std::fs::remove_file(&path);
        let store = Store::open(StoreLocation::Sqlite(path.clone())).await.expect("open");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("db file").permissions().mode();
        assert_eq!(mode & 0o077, 0, "the database is private to its owner: {mode:o}");
        assert_eq!(store.revision().await.expect("revision"), 0);
        let (stored, answer) = store
            .update(|current| {
                let mut doc = current.document;
                doc["services"] = json!([{"name": "a", "host": "h"}]);
                Change {
                    write: Some(doc),
                    answer: 7,
                }
            })
            .await
            .expect("update");
        assert_eq!((stored.map(|s| s.revision), answer), (Some(1), 7));
        // A change that decides not to write leaves the revision alone.
        let (stored, ()) = store
            .update(|_| Change {
                write: None,
                answer: (),
            })
            .await
            .expect("no-op");
        assert!(stored.is_none());
        drop(store);
        let store = Store::open(StoreLocation::Sqlite(path)).await.expect("reopen");
        let loaded = store.load().await.expect("load");
        assert_eq!(loaded.revision, 1);
        assert_eq!(loaded.document["services"][0]["name"], "a");
    }
}
