//! The controller's state, in SQLite (default, WAL) or PostgreSQL: the only module that imports
//! sqlx. Queries are written once with `$N` parameters, which both drivers accept; the schema has
//! one migration set per database (`controller/migrations/{sqlite,postgres}`). Every change that
//! the audit log records is written in the same transaction as its audit row.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Executor, Row, Transaction};
use tokio::sync::Mutex;

use super::audit::{AuditEntry, AuditRecord};

mod drift;
pub use drift::{DetectorRow, DriftChange, DriftEventRow, RetrainRow};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("cannot migrate the database schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Refused(String),
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[derive(Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// One writer at a time in this process (SQLite allows one anyway; on PostgreSQL the audit
    /// table lock orders writers across replicas).
    writer: Mutex<()>,
}

/// An API token as stored (the secret itself is never stored, only its SHA-256).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApiTokenRow {
    pub id: String,
    pub name: String,
    pub role: String,
    pub created_by: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EnrollTokenRow {
    pub id: String,
    pub labels: serde_json::Value,
    pub created_by: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    pub used_by: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewDevice {
    pub id: String,
    pub arch: String,
    pub agent_version: String,
    pub mac_key: Vec<u8>,
    pub cert_serial: String,
    pub cert_pem: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceRow {
    pub id: String,
    pub arch: String,
    pub agent_version: String,
    pub labels: serde_json::Value,
    #[serde(skip)]
    pub mac_key: Vec<u8>,
    pub cert_serial: String,
    pub enrolled_at: i64,
    pub revoked_at: Option<i64>,
    pub online: bool,
    pub last_seen: Option<i64>,
    pub status: Option<serde_json::Value>,
    pub active_digest: Option<String>,
    pub previous_digest: Option<String>,
    pub shadow_digest: Option<String>,
    pub assignment_seq: i64,
    pub assignment: Option<serde_json::Value>,
}

/// What a device's retained status says, as the store keeps it.
#[derive(Debug, Clone)]
pub struct StatusUpdate {
    pub online: bool,
    pub agent_version: String,
    pub status: serde_json::Value,
    pub active: Option<String>,
    pub previous: Option<String>,
    pub shadow: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelRow {
    pub digest: String,
    pub name: String,
    pub version: String,
    pub release: i64,
    #[serde(skip)]
    pub signed_manifest: Vec<u8>,
    pub manifest: serde_json::Value,
    pub signatures: i64,
    pub bundle_size: i64,
    #[serde(skip)]
    pub bundle_path: String,
    pub parent: Option<String>,
    pub created_by: String,
    pub created_at: i64,
}

/// One device report to ingest.
#[derive(Debug, Clone)]
pub struct Report {
    pub device: String,
    pub seq: i64,
    pub kind: &'static str,
    pub sent_at: i64,
    pub model_digest: Option<String>,
    pub body: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReportRow {
    pub seq: i64,
    pub kind: String,
    pub sent_at: i64,
    pub received_at: i64,
    pub model_digest: Option<String>,
    pub body: serde_json::Value,
}

fn json_col(row: &AnyRow, col: &str) -> Result<serde_json::Value> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn opt_json_col(row: &AnyRow, col: &str) -> Result<Option<serde_json::Value>> {
    let text: Option<String> = row.try_get(col)?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(format!("{col}: {e}"))))
        .transpose()
}

const DEVICE_COLUMNS: &str = "id, arch, agent_version, labels, mac_key, cert_serial, enrolled_at, \
     revoked_at, online, last_seen, status, active_digest, previous_digest, shadow_digest, \
     assignment_seq, assignment_json";

fn device_row(row: &AnyRow) -> Result<DeviceRow> {
    Ok(DeviceRow {
        id: row.try_get("id")?,
        arch: row.try_get("arch")?,
        agent_version: row.try_get("agent_version")?,
        labels: json_col(row, "labels")?,
        mac_key: row.try_get("mac_key")?,
        cert_serial: row.try_get("cert_serial")?,
        enrolled_at: row.try_get("enrolled_at")?,
        revoked_at: row.try_get("revoked_at")?,
        online: row.try_get::<i64, _>("online")? != 0,
        last_seen: row.try_get("last_seen")?,
        status: opt_json_col(row, "status")?,
        active_digest: row.try_get("active_digest")?,
        previous_digest: row.try_get("previous_digest")?,
        shadow_digest: row.try_get("shadow_digest")?,
        assignment_seq: row.try_get("assignment_seq")?,
        assignment: opt_json_col(row, "assignment_json")?,
    })
}

const MODEL_COLUMNS: &str = "digest, name, version, release_counter, signed_manifest, \
     manifest_json, signatures, bundle_size, bundle_path, parent, created_by, created_at";

/// A rollout: the engine's state (JSON) and its compare-and-set version.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RolloutRow {
    pub id: String,
    /// `rollout` or `experiment`: which engine `state` belongs to.
    pub kind: String,
    pub candidate: String,
    pub baseline: String,
    /// The label selector members were chosen by (JSON object).
    pub selector: serde_json::Value,
    pub phase: String,
    pub state: serde_json::Value,
    pub version: i64,
    pub next_deadline: Option<i64>,
    pub created_by: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A rollout's state change: the new state and the actions to carry out, committed together.
#[derive(Debug, Clone)]
pub struct RolloutChange {
    pub phase: String,
    pub state: serde_json::Value,
    pub next_deadline: Option<i64>,
    /// Actions (JSON) appended to the rollout's outbox.
    pub outbox: Vec<String>,
}

/// One outbox assignment to carry out: `build(seq)` signs the device's next assignment and
/// returns it with its JSON summary (or why it cannot be built).
pub struct OutboxAssignment {
    pub seq: i64,
    pub device: String,
    #[allow(clippy::type_complexity)]
    pub build:
        Box<dyn FnOnce(u64) -> std::result::Result<(Vec<u8>, serde_json::Value), String> + Send>,
    pub audit: AuditEntry,
}

impl std::fmt::Debug for OutboxAssignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxAssignment")
            .field("seq", &self.seq)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// What became of one outbox assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxOutcome {
    /// Stored; publish these bytes.
    Signed { device: String, bytes: Vec<u8> },
    /// Not carried out (and removed from the outbox): the device cannot take assignments.
    Refused { device: String, reason: String },
    /// Carried out before (a restart after the commit).
    AlreadyDone,
}

fn rollout_row(row: &AnyRow) -> Result<RolloutRow> {
    Ok(RolloutRow {
        id: row.try_get("id")?,
        kind: row.try_get("kind")?,
        candidate: row.try_get("candidate")?,
        baseline: row.try_get("baseline")?,
        selector: json_col(row, "selector")?,
        phase: row.try_get("phase")?,
        state: json_col(row, "state")?,
        version: row.try_get("version")?,
        next_deadline: row.try_get("next_deadline")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn model_row(row: &AnyRow) -> Result<ModelRow> {
    Ok(ModelRow {
        digest: row.try_get("digest")?,
        name: row.try_get("name")?,
        version: row.try_get("version")?,
        release: row.try_get("release_counter")?,
        signed_manifest: row.try_get("signed_manifest")?,
        manifest: json_col(row, "manifest_json")?,
        signatures: row.try_get("signatures")?,
        bundle_size: row.try_get("bundle_size")?,
        bundle_path: row.try_get("bundle_path")?,
        parent: row.try_get("parent")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
    })
}

fn audit_row(row: &AnyRow) -> Result<AuditRecord> {
    Ok(AuditRecord {
        seq: row.try_get("seq")?,
        at: row.try_get("at")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        object: row.try_get("object")?,
        details: row.try_get("details")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

fn enroll_token_row(row: &AnyRow) -> Result<EnrollTokenRow> {
    Ok(EnrollTokenRow {
        id: row.try_get("id")?,
        labels: json_col(row, "labels")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        used_at: row.try_get("used_at")?,
        used_by: row.try_get("used_by")?,
    })
}

fn api_token_row(row: &AnyRow) -> Result<ApiTokenRow> {
    Ok(ApiTokenRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: row.try_get("role")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

impl Store {
    /// Opens (creating if needed) the database at `url` and applies the migrations.
    /// `sqlite://PATH` or `postgres://…`.
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::Refused(format!(
                "unsupported database URL {:?}: use sqlite://PATH or postgres://USER@HOST/DB",
                redact(url)
            )));
        };
        let url = match backend {
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_owned(),
        };
        let options = sqlx::any::AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 8,
            })
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        Ok(Self {
            pool,
            backend,
            writer: Mutex::new(()),
        })
    }

    pub fn sqlite_url(path: &Path) -> String {
        format!("sqlite://{}", path.display())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Runs `f` in a write transaction and appends the audit entry it returns (if any) in the
    /// same transaction: the one path every audited change takes. `audited` says up front whether
    /// an entry may come, so PostgreSQL replicas queue on the audit table before reading.
    async fn transaction<T, F>(&self, now: i64, audited: bool, f: F) -> Result<T>
    where
        F: for<'t> FnOnce(
            &'t mut Transaction<'static, Any>,
        )
            -> futures_util::future::BoxFuture<'t, Result<(T, Option<AuditEntry>)>>,
    {
        let _guard = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        if audited && self.backend == Backend::Postgres {
            tx.execute("LOCK TABLE audit_log IN EXCLUSIVE MODE").await?;
        }
        let (value, audit) = f(&mut tx).await?;
        if let Some(entry) = audit {
            append_audit(&mut tx, &entry, now).await?;
        }
        tx.commit().await?;
        Ok(value)
    }

    /// [`Store::transaction`] with an audit entry known before the change.
    async fn write<T, F>(&self, now: i64, audit: Option<AuditEntry>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(
                &'t mut Transaction<'static, Any>,
            ) -> futures_util::future::BoxFuture<'t, Result<T>>
            + Send
            + 'static,
    {
        self.transaction(now, audit.is_some(), move |tx| {
            Box::pin(async move { Ok((f(tx).await?, audit)) })
        })
        .await
    }

    /// Records an action that changes nothing else (e.g. a signed download, a login).
    pub async fn audit(&self, now: i64, entry: AuditEntry) -> Result<()> {
        self.write(now, Some(entry), |_| Box::pin(async { Ok(()) }))
            .await
    }

    // ---- API tokens ----

    pub async fn count_api_tokens(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM api_tokens WHERE revoked_at IS NULL")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    pub async fn create_api_token(
        &self,
        now: i64,
        row: &ApiTokenRow,
        token_hash: &str,
        audit: AuditEntry,
    ) -> Result<()> {
        let (row, token_hash) = (row.clone(), token_hash.to_owned());
        self.write(now, Some(audit), move |tx| {
            Box::pin(async move {
                let name_taken =
                    sqlx::query("SELECT id FROM api_tokens WHERE name = $1 AND revoked_at IS NULL")
                        .bind(&row.name)
                        .fetch_optional(&mut **tx)
                        .await?;
                if name_taken.is_some() {
                    return Err(StoreError::Conflict(format!(
                        "an API token named {:?} exists; revoke it first or pick another name",
                        row.name
                    )));
                }
                sqlx::query(
                    "INSERT INTO api_tokens (id, name, token_hash, role, created_by, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&row.id)
                .bind(&row.name)
                .bind(&token_hash)
                .bind(&row.role)
                .bind(&row.created_by)
                .bind(row.created_at)
                .execute(&mut **tx)
                .await?;
                Ok(())
            })
        })
        .await
    }

    pub async fn find_api_token(&self, token_hash: &str) -> Result<Option<ApiTokenRow>> {
        sqlx::query(
            "SELECT id, name, role, created_by, created_at, revoked_at FROM api_tokens \
             WHERE token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| api_token_row(&r))
        .transpose()
    }

    pub async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRow>> {
        sqlx::query(
            "SELECT id, name, role, created_by, created_at, revoked_at FROM api_tokens \
             ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(api_token_row)
        .collect()
    }

    pub async fn revoke_api_token(&self, now: i64, id: &str, audit: AuditEntry) -> Result<()> {
        let id = id.to_owned();
        self.write(now, Some(audit), move |tx| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                )
                .bind(now)
                .bind(&id)
                .execute(&mut **tx)
                .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound(format!("active API token {id:?}")));
                }
                Ok(())
            })
        })
        .await
    }

    // ---- enrollment tokens ----

    pub async fn create_enroll_token(
        &self,
        now: i64,
        row: &EnrollTokenRow,
        token_hash: &str,
        audit: AuditEntry,
    ) -> Result<()> {
        let (row, token_hash) = (row.clone(), token_hash.to_owned());
        self.write(now, Some(audit), move |tx| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO enroll_tokens (id, token_hash, labels, created_by, created_at, \
                     expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&row.id)
                .bind(&token_hash)
                .bind(row.labels.to_string())
                .bind(&row.created_by)
                .bind(row.created_at)
                .bind(row.expires_at)
                .execute(&mut **tx)
                .await?;
                Ok(())
            })
        })
        .await
    }

    pub async fn list_enroll_tokens(&self) -> Result<Vec<EnrollTokenRow>> {
        sqlx::query(
            "SELECT id, labels, created_by, created_at, expires_at, used_at, used_by \
             FROM enroll_tokens ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(enroll_token_row)
        .collect()
    }

    /// Spends the enrollment token and registers the device, or refuses with the reason.
    pub async fn enroll(
        &self,
        now: i64,
        token_hash: &str,
        device: NewDevice,
        audit: impl FnOnce(&EnrollTokenRow) -> AuditEntry + Send + 'static,
    ) -> Result<EnrollTokenRow> {
        let token_hash = token_hash.to_owned();
        self.transaction(now, true, move |tx| {
            Box::pin(async move {
                let token = sqlx::query(
                    "SELECT id, labels, created_by, created_at, expires_at, used_at, used_by \
                     FROM enroll_tokens WHERE token_hash = $1",
                )
                .bind(token_hash)
                .fetch_optional(&mut **tx)
                .await?
                .map(|r| enroll_token_row(&r))
                .transpose()?
                .ok_or_else(|| {
                    StoreError::Refused(
                        "unknown enrollment token: ask an operator for a new one \
                         (`edgefleet enroll-token create`)"
                            .into(),
                    )
                })?;
                if let Some(by) = &token.used_by {
                    return Err(StoreError::Refused(format!(
                        "this enrollment token was already used (by device {by:?}); tokens are one-time, ask for a new one"
                    )));
                }
                if token.expires_at <= now {
                    return Err(StoreError::Refused(
                        "this enrollment token has expired; ask an operator for a new one".into(),
                    ));
                }
                let existing = sqlx::query("SELECT revoked_at FROM devices WHERE id = $1")
                    .bind(&device.id)
                    .fetch_optional(&mut **tx)
                    .await?;
                if existing.is_some() {
                    return Err(StoreError::Conflict(format!(
                        "device {:?} is already enrolled; pick another device id, or delete the old record first",
                        device.id
                    )));
                }
                sqlx::query("UPDATE enroll_tokens SET used_at = $1, used_by = $2 WHERE id = $3")
                    .bind(now)
                    .bind(&device.id)
                    .bind(&token.id)
                    .execute(&mut **tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO devices (id, arch, agent_version, labels, mac_key, cert_serial, cert_pem, \
                     enrolled_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&device.id)
                .bind(&device.arch)
                .bind(&device.agent_version)
                .bind(token.labels.to_string())
                .bind(&device.mac_key)
                .bind(&device.cert_serial)
                .bind(&device.cert_pem)
                .bind(now)
                .execute(&mut **tx)
                .await?;
                let entry = audit(&token);
                Ok((token, Some(entry)))
            })
        })
        .await
    }

    // ---- devices ----

    pub async fn get_device(&self, id: &str) -> Result<DeviceRow> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1");
        sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| device_row(&r))
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("device {id:?}")))
    }

    pub async fn list_devices(&self) -> Result<Vec<DeviceRow>> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id");
        sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(device_row)
            .collect()
    }

    pub async fn set_labels(
        &self,
        now: i64,
        id: &str,
        labels: serde_json::Value,
        audit: AuditEntry,
    ) -> Result<()> {
        let id = id.to_owned();
        self.write(now, Some(audit), move |tx| {
            Box::pin(async move {
                let done = sqlx::query("UPDATE devices SET labels = $1 WHERE id = $2")
                    .bind(labels.to_string())
                    .bind(&id)
                    .execute(&mut **tx)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound(format!("device {id:?}")));
                }
                Ok(())
            })
        })
        .await
    }

    pub async fn revoke_device(&self, now: i64, id: &str, audit: AuditEntry) -> Result<()> {
        let id = id.to_owned();
        self.write(now, Some(audit), move |tx| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE devices SET revoked_at = $1, online = 0, assignment = NULL \
                     WHERE id = $2 AND revoked_at IS NULL",
                )
                .bind(now)
                .bind(&id)
                .execute(&mut **tx)
                .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound(format!(
                        "enrolled, unrevoked device {id:?}"
                    )));
                }
                Ok(())
            })
        })
        .await
    }

    /// The certificates of revoked devices (serial, revocation time), for the CRL.
    pub async fn revoked_certificates(&self) -> Result<Vec<(String, i64)>> {
        sqlx::query(
            "SELECT cert_serial, revoked_at FROM devices WHERE revoked_at IS NOT NULL \
             ORDER BY revoked_at, id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("cert_serial")?, r.try_get("revoked_at")?)))
        .collect()
    }

    /// A device's MAC key and whether it is revoked (what the ingest's key cache holds).
    pub async fn device_key(&self, id: &str) -> Result<Option<(Vec<u8>, bool)>> {
        let row = sqlx::query("SELECT mac_key, revoked_at FROM devices WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok((
                r.try_get::<Vec<u8>, _>("mac_key")?,
                r.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
            ))
        })
        .transpose()
    }

    pub async fn update_status(&self, now: i64, id: &str, update: StatusUpdate) -> Result<()> {
        let _guard = self.writer.lock().await;
        sqlx::query(
            "UPDATE devices SET online = $1, last_seen = $2, status = $3, agent_version = $4, \
             active_digest = $5, previous_digest = $6, shadow_digest = $7 WHERE id = $8",
        )
        .bind(i64::from(update.online))
        .bind(now)
        .bind(update.status.to_string())
        .bind(&update.agent_version)
        .bind(&update.active)
        .bind(&update.previous)
        .bind(&update.shadow)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Issues the device's next assignment: `build(seq)` returns the signed bytes and a JSON
    /// summary; both are stored with the new sequence number and audited in one transaction.
    pub async fn assign<F>(
        &self,
        now: i64,
        id: &str,
        build: F,
        audit: AuditEntry,
    ) -> Result<Vec<u8>>
    where
        F: FnOnce(u64) -> std::result::Result<(Vec<u8>, serde_json::Value), String>
            + Send
            + 'static,
    {
        let id = id.to_owned();
        self.write(now, Some(audit), move |tx| {
            Box::pin(async move {
                let row =
                    sqlx::query("SELECT assignment_seq, revoked_at FROM devices WHERE id = $1")
                        .bind(&id)
                        .fetch_optional(&mut **tx)
                        .await?
                        .ok_or_else(|| StoreError::NotFound(format!("device {id:?}")))?;
                if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
                    return Err(StoreError::Refused(format!(
                        "device {id:?} is revoked and gets no assignments"
                    )));
                }
                let seq = row.try_get::<i64, _>("assignment_seq")? + 1;
                let (bytes, summary) = build(seq as u64).map_err(StoreError::Refused)?;
                sqlx::query(
                    "UPDATE devices SET assignment_seq = $1, assignment = $2, assignment_json = $3 \
                     WHERE id = $4",
                )
                .bind(seq)
                .bind(&bytes)
                .bind(summary.to_string())
                .bind(&id)
                .execute(&mut **tx)
                .await?;
                Ok(bytes)
            })
        })
        .await
    }

    /// Every unrevoked device's current signed assignment, for re-publishing.
    pub async fn assignments(&self) -> Result<Vec<(String, Vec<u8>)>> {
        sqlx::query(
            "SELECT id, assignment FROM devices WHERE assignment IS NOT NULL AND revoked_at IS NULL",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("assignment")?)))
        .collect()
    }

    // ---- models ----

    pub async fn insert_model(&self, now: i64, model: &ModelRow, audit: AuditEntry) -> Result<()> {
        let m = model.clone();
        self.write(now, Some(audit), move |tx| {
            Box::pin(async move {
                let clash = sqlx::query(
                    "SELECT digest FROM models WHERE digest = $1 OR (name = $2 AND version = $3)",
                )
                .bind(&m.digest)
                .bind(&m.name)
                .bind(&m.version)
                .fetch_optional(&mut **tx)
                .await?;
                if clash.is_some() {
                    return Err(StoreError::Conflict(format!(
                        "model {} {} is already registered; register a new version",
                        m.name, m.version
                    )));
                }
                let higher =
                    sqlx::query("SELECT MAX(release_counter) AS top FROM models WHERE name = $1")
                        .bind(&m.name)
                        .fetch_one(&mut **tx)
                        .await?
                        .try_get::<Option<i64>, _>("top")?;
                if let Some(top) = higher
                    && top >= m.release
                {
                    return Err(StoreError::Conflict(format!(
                        "release counter {} of {} is not above the highest registered ({top}); \
                         devices refuse releases below their floor",
                        m.release, m.name
                    )));
                }
                sqlx::query(
                    "INSERT INTO models (digest, name, version, release_counter, signed_manifest, \
                     manifest_json, signatures, bundle_size, bundle_path, parent, created_by, \
                     created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                )
                .bind(&m.digest)
                .bind(&m.name)
                .bind(&m.version)
                .bind(m.release)
                .bind(&m.signed_manifest)
                .bind(m.manifest.to_string())
                .bind(m.signatures)
                .bind(m.bundle_size)
                .bind(&m.bundle_path)
                .bind(&m.parent)
                .bind(&m.created_by)
                .bind(m.created_at)
                .execute(&mut **tx)
                .await?;
                Ok(())
            })
        })
        .await
    }

    /// Replaces a model's signed manifest with one carrying more signatures (same body), and
    /// its bundle file with the re-headed one.
    #[allow(clippy::too_many_arguments)]
    pub async fn update_signatures(
        &self,
        now: i64,
        digest: &str,
        signed_manifest: Vec<u8>,
        signatures: i64,
        bundle_path: String,
        bundle_size: i64,
        audit: AuditEntry,
    ) -> Result<()> {
        let digest = digest.to_owned();
        self.write(now, Some(audit), move |tx| {
            Box::pin(async move {
                sqlx::query(
                    "UPDATE models SET signed_manifest = $1, signatures = $2, bundle_path = $3, \
                     bundle_size = $4 WHERE digest = $5",
                )
                .bind(&signed_manifest)
                .bind(signatures)
                .bind(&bundle_path)
                .bind(bundle_size)
                .bind(&digest)
                .execute(&mut **tx)
                .await?;
                Ok(())
            })
        })
        .await
    }

    pub async fn get_model(&self, digest: &str) -> Result<ModelRow> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models WHERE digest = $1");
        sqlx::query(&sql)
            .bind(digest)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| model_row(&r))
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("model {digest}")))
    }

    pub async fn find_model(&self, name: &str, version: &str) -> Result<ModelRow> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = $1 AND version = $2");
        sqlx::query(&sql)
            .bind(name)
            .bind(version)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| model_row(&r))
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("model {name} {version}")))
    }

    pub async fn list_models(&self) -> Result<Vec<ModelRow>> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models ORDER BY name, release_counter");
        sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(model_row)
            .collect()
    }

    // ---- ingest ----

    /// Commits a batch of reports in one transaction, idempotently on (device, seq); returns the
    /// (device, seq) of those that were new. Every report in the batch is durable when this
    /// returns.
    pub async fn ingest(&self, now: i64, batch: &[Report]) -> Result<Vec<(String, i64)>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let _guard = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let mut inserted = Vec::new();
        // Multi-row inserts keep round trips down; 7 parameters per row.
        for chunk in batch.chunks(64) {
            let mut sql = String::from(
                "INSERT INTO reports (device, seq, kind, sent_at, received_at, model_digest, body) VALUES ",
            );
            for i in 0..chunk.len() {
                let b = i * 7;
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7
                ));
            }
            sql.push_str(" ON CONFLICT (device, seq) DO NOTHING RETURNING device, seq");
            let mut query = sqlx::query(&sql);
            for r in chunk {
                query = query
                    .bind(&r.device)
                    .bind(r.seq)
                    .bind(r.kind)
                    .bind(r.sent_at)
                    .bind(now)
                    .bind(&r.model_digest)
                    .bind(&r.body);
            }
            for row in query.fetch_all(&mut *tx).await? {
                inserted.push((row.try_get("device")?, row.try_get("seq")?));
            }
        }
        tx.commit().await?;
        Ok(inserted)
    }

    pub async fn recent_reports(
        &self,
        device: &str,
        kind: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ReportRow>> {
        let rows = match kind {
            Some(kind) => {
                sqlx::query(
                    "SELECT seq, kind, sent_at, received_at, model_digest, body FROM reports \
                     WHERE device = $1 AND kind = $2 ORDER BY seq DESC LIMIT $3",
                )
                .bind(device)
                .bind(kind)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT seq, kind, sent_at, received_at, model_digest, body FROM reports \
                     WHERE device = $1 ORDER BY seq DESC LIMIT $2",
                )
                .bind(device)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter()
            .map(|r| {
                Ok(ReportRow {
                    seq: r.try_get("seq")?,
                    kind: r.try_get("kind")?,
                    sent_at: r.try_get("sent_at")?,
                    received_at: r.try_get("received_at")?,
                    model_digest: r.try_get("model_digest")?,
                    body: json_col(r, "body")?,
                })
            })
            .collect()
    }

    /// `(device, kind, count)` of everything ingested.
    pub async fn report_counts(&self) -> Result<Vec<(String, String, i64)>> {
        sqlx::query(
            "SELECT device, kind, COUNT(*) AS n FROM reports GROUP BY device, kind ORDER BY device, kind",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("device")?, r.try_get("kind")?, r.try_get("n")?)))
        .collect()
    }

    // ---- rollouts ----

    /// Creates a rollout at version 1 with its first actions in the outbox and its records in
    /// the audit log.
    pub async fn create_rollout(
        &self,
        now: i64,
        row: &RolloutRow,
        change: RolloutChange,
        audits: Vec<AuditEntry>,
    ) -> Result<()> {
        let row = row.clone();
        self.transaction(now, true, move |tx| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO rollouts (id, kind, candidate, baseline, selector, phase, state, \
                     version, next_deadline, created_by, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $9, $10, $10)",
                )
                .bind(&row.id)
                .bind(&row.kind)
                .bind(&row.candidate)
                .bind(&row.baseline)
                .bind(row.selector.to_string())
                .bind(&change.phase)
                .bind(change.state.to_string())
                .bind(change.next_deadline)
                .bind(&row.created_by)
                .bind(now)
                .execute(&mut **tx)
                .await?;
                append_outbox(tx, &row.id, &change.outbox).await?;
                append_audits(tx, &audits, now).await?;
                Ok(((), None))
            })
        })
        .await
    }

    /// Replaces a rollout's state if it is still at `version` (else `Conflict`: another writer
    /// moved it), appends the actions to its outbox and the records to the audit log, and
    /// returns the new version.
    pub async fn save_rollout(
        &self,
        now: i64,
        id: &str,
        version: i64,
        change: RolloutChange,
        audits: Vec<AuditEntry>,
    ) -> Result<i64> {
        let id = id.to_owned();
        self.transaction(now, !audits.is_empty(), move |tx| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE rollouts SET phase = $1, state = $2, next_deadline = $3, \
                     version = version + 1, updated_at = $4 WHERE id = $5 AND version = $6",
                )
                .bind(&change.phase)
                .bind(change.state.to_string())
                .bind(change.next_deadline)
                .bind(now)
                .bind(&id)
                .bind(version)
                .execute(&mut **tx)
                .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::Conflict(format!(
                        "rollout {id:?} is not at version {version} any more"
                    )));
                }
                append_outbox(tx, &id, &change.outbox).await?;
                append_audits(tx, &audits, now).await?;
                Ok((version + 1, None))
            })
        })
        .await
    }

    pub async fn get_rollout(&self, id: &str) -> Result<RolloutRow> {
        let row = sqlx::query("SELECT * FROM rollouts WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("rollout {id:?}")))?;
        rollout_row(&row)
    }

    pub async fn list_rollouts(&self) -> Result<Vec<RolloutRow>> {
        sqlx::query("SELECT * FROM rollouts ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rollout_row)
            .collect()
    }

    /// Rollouts whose phase is not one of `finished`.
    pub async fn unfinished_rollouts(&self, finished: &[&str]) -> Result<Vec<RolloutRow>> {
        Ok(self
            .list_rollouts()
            .await?
            .into_iter()
            .filter(|r| !finished.contains(&r.phase.as_str()))
            .collect())
    }

    /// The rollout's actions not yet carried out, oldest first.
    pub async fn rollout_outbox(&self, id: &str) -> Result<Vec<(i64, String)>> {
        sqlx::query("SELECT seq, action FROM rollout_outbox WHERE rollout = $1 ORDER BY seq")
            .bind(id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("seq")?, r.try_get("action")?)))
            .collect()
    }

    /// Carries out a rollout's outbox assignments in one transaction: each one's outbox entry is
    /// removed in the same transaction that stores the device's next signed assignment (and its
    /// audit row), so an entry is carried out exactly once even across crashes. An entry already
    /// gone (carried out before) is skipped; a device that is revoked or gone is reported, its
    /// entry removed.
    pub async fn assign_from_outbox(
        &self,
        now: i64,
        rollout: &str,
        items: Vec<OutboxAssignment>,
    ) -> Result<Vec<OutboxOutcome>> {
        let rollout = rollout.to_owned();
        self.transaction(now, true, move |tx| {
            Box::pin(async move {
                let mut outcomes = Vec::with_capacity(items.len());
                for item in items {
                    let removed =
                        sqlx::query("DELETE FROM rollout_outbox WHERE rollout = $1 AND seq = $2")
                            .bind(&rollout)
                            .bind(item.seq)
                            .execute(&mut **tx)
                            .await?;
                    if removed.rows_affected() == 0 {
                        outcomes.push(OutboxOutcome::AlreadyDone);
                        continue;
                    }
                    let row =
                        sqlx::query("SELECT assignment_seq, revoked_at FROM devices WHERE id = $1")
                            .bind(&item.device)
                            .fetch_optional(&mut **tx)
                            .await?;
                    let Some(row) = row else {
                        outcomes.push(OutboxOutcome::Refused {
                            device: item.device,
                            reason: "the device is not enrolled".into(),
                        });
                        continue;
                    };
                    if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
                        outcomes.push(OutboxOutcome::Refused {
                            device: item.device,
                            reason: "the device is revoked".into(),
                        });
                        continue;
                    }
                    let seq = row.try_get::<i64, _>("assignment_seq")? + 1;
                    let (bytes, summary) = match (item.build)(seq as u64) {
                        Ok(built) => built,
                        Err(reason) => {
                            outcomes.push(OutboxOutcome::Refused {
                                device: item.device,
                                reason,
                            });
                            continue;
                        }
                    };
                    sqlx::query(
                        "UPDATE devices SET assignment_seq = $1, assignment = $2, \
                         assignment_json = $3 WHERE id = $4",
                    )
                    .bind(seq)
                    .bind(&bytes)
                    .bind(summary.to_string())
                    .bind(&item.device)
                    .execute(&mut **tx)
                    .await?;
                    append_audit(tx, &item.audit, now).await?;
                    outcomes.push(OutboxOutcome::Signed {
                        device: item.device,
                        bytes,
                    });
                }
                Ok((outcomes, None))
            })
        })
        .await
    }

    // ---- audit ----

    /// Audit rows with `seq > after`, oldest first, at most `limit`.
    pub async fn audit_rows(&self, after: i64, limit: i64) -> Result<Vec<AuditRecord>> {
        sqlx::query(
            "SELECT seq, at, actor, action, object, details, prev_hash, hash FROM audit_log \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(audit_row)
        .collect()
    }

    /// The latest `limit` audit rows about `object`, oldest first.
    pub async fn audit_for(&self, object: &str, limit: i64) -> Result<Vec<AuditRecord>> {
        let mut rows = sqlx::query(
            "SELECT seq, at, actor, action, object, details, prev_hash, hash FROM audit_log \
             WHERE object = $1 ORDER BY seq DESC LIMIT $2",
        )
        .bind(object)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(audit_row)
        .collect::<Result<Vec<_>>>()?;
        rows.reverse();
        Ok(rows)
    }

    /// Runs raw SQL: for tests that play an attacker with direct database access.
    #[doc(hidden)]
    pub async fn execute_raw(&self, sql: &str) -> Result<u64> {
        Ok(self.pool.execute(sql).await?.rows_affected())
    }

    // ---- data capture ----

    /// Turns capture on for `device` with `settings` (JSON), or off (`None`), audited in the
    /// same transaction.
    pub async fn set_capture_settings(
        &self,
        now: i64,
        device: &str,
        settings: Option<serde_json::Value>,
        updated_by: &str,
        audit: AuditEntry,
    ) -> Result<()> {
        let (device, updated_by) = (device.to_owned(), updated_by.to_owned());
        self.write(now, Some(audit), move |tx| {
            Box::pin(async move {
                let known = sqlx::query("SELECT revoked_at FROM devices WHERE id = $1")
                    .bind(&device)
                    .fetch_optional(&mut **tx)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("device {device:?}")))?;
                if settings.is_some() && known.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
                    return Err(StoreError::Refused(format!(
                        "device {device:?} is revoked; it captures nothing"
                    )));
                }
                sqlx::query("DELETE FROM capture_settings WHERE device = $1")
                    .bind(&device)
                    .execute(&mut **tx)
                    .await?;
                if let Some(settings) = settings {
                    sqlx::query(
                        "INSERT INTO capture_settings (device, settings, updated_by, updated_at) \
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(&device)
                    .bind(settings.to_string())
                    .bind(&updated_by)
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
                }
                Ok(())
            })
        })
        .await
    }

    /// `device`'s current signed assignment, if it has one.
    pub async fn device_assignment(&self, device: &str) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT assignment FROM devices WHERE id = $1")
            .bind(device)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("device {device:?}")))?;
        Ok(row
            .try_get::<Option<Vec<u8>>, _>("assignment")?
            .filter(|bytes| !bytes.is_empty()))
    }

    /// The capture settings (JSON) of `device`; `None` when capture is off.
    pub async fn capture_settings(&self, device: &str) -> Result<Option<serde_json::Value>> {
        sqlx::query("SELECT settings FROM capture_settings WHERE device = $1")
            .bind(device)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| json_col(&r, "settings"))
            .transpose()
    }

    /// Records a device's announced batch (once per (device, batch)) and returns the row as
    /// stored, which may be an earlier announcement of the same batch.
    pub async fn record_capture(&self, now: i64, capture: &CaptureRow) -> Result<CaptureRow> {
        let c = capture.clone();
        let _guard = self.writer.lock().await;
        sqlx::query(
            "INSERT INTO captures (device, batch, model_digest, samples, bytes, sha256, first_at, \
             last_at, noticed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (device, batch) DO NOTHING",
        )
        .bind(&c.device)
        .bind(c.batch)
        .bind(&c.model_digest)
        .bind(c.samples)
        .bind(c.bytes)
        .bind(&c.sha256)
        .bind(c.first_at)
        .bind(c.last_at)
        .bind(now)
        .execute(&self.pool)
        .await?;
        drop(_guard);
        self.capture(&c.device, c.batch).await?.ok_or_else(|| {
            StoreError::Corrupt(format!("capture {} {} vanished", c.device, c.batch))
        })
    }

    pub async fn capture(&self, device: &str, batch: i64) -> Result<Option<CaptureRow>> {
        let sql =
            format!("SELECT {CAPTURE_COLUMNS} FROM captures WHERE device = $1 AND batch = $2");
        sqlx::query(&sql)
            .bind(device)
            .bind(batch)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| capture_row(&r))
            .transpose()
    }

    /// Marks a batch uploaded, its file at `path`.
    pub async fn capture_uploaded(
        &self,
        now: i64,
        device: &str,
        batch: i64,
        path: &str,
    ) -> Result<()> {
        let _guard = self.writer.lock().await;
        sqlx::query(
            "UPDATE captures SET uploaded_at = $1, path = $2 WHERE device = $3 AND batch = $4",
        )
        .bind(now)
        .bind(path)
        .bind(device)
        .bind(batch)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Announced batches, by model digest (any of `models`; all when empty) and device,
    /// oldest first.
    pub async fn list_captures(
        &self,
        models: &[String],
        device: Option<&str>,
    ) -> Result<Vec<CaptureRow>> {
        let sql =
            format!("SELECT {CAPTURE_COLUMNS} FROM captures ORDER BY first_at, device, batch");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        let mut out = Vec::new();
        for row in &rows {
            let row = capture_row(row)?;
            if (models.is_empty() || models.contains(&row.model_digest))
                && device.is_none_or(|d| d == row.device)
            {
                out.push(row);
            }
        }
        Ok(out)
    }
}

/// One announced capture batch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CaptureRow {
    pub device: String,
    pub batch: i64,
    pub model_digest: String,
    pub samples: i64,
    pub bytes: i64,
    pub sha256: String,
    pub first_at: i64,
    pub last_at: i64,
    pub noticed_at: i64,
    pub uploaded_at: Option<i64>,
    #[serde(skip)]
    pub path: Option<String>,
}

const CAPTURE_COLUMNS: &str = "device, batch, model_digest, samples, bytes, sha256, first_at, \
     last_at, noticed_at, uploaded_at, path";

fn capture_row(row: &AnyRow) -> Result<CaptureRow> {
    Ok(CaptureRow {
        device: row.try_get("device")?,
        batch: row.try_get("batch")?,
        model_digest: row.try_get("model_digest")?,
        samples: row.try_get("samples")?,
        bytes: row.try_get("bytes")?,
        sha256: row.try_get("sha256")?,
        first_at: row.try_get("first_at")?,
        last_at: row.try_get("last_at")?,
        noticed_at: row.try_get("noticed_at")?,
        uploaded_at: row.try_get("uploaded_at")?,
        path: row.try_get("path")?,
    })
}

/// Appends `actions` to a rollout's outbox after its last entry.
async fn append_outbox(
    tx: &mut Transaction<'static, Any>,
    rollout: &str,
    actions: &[String],
) -> Result<()> {
    let last: Option<i64> =
        sqlx::query_scalar("SELECT MAX(seq) FROM rollout_outbox WHERE rollout = $1")
            .bind(rollout)
            .fetch_one(&mut **tx)
            .await?;
    for (i, action) in actions.iter().enumerate() {
        sqlx::query("INSERT INTO rollout_outbox (rollout, seq, action) VALUES ($1, $2, $3)")
            .bind(rollout)
            .bind(last.unwrap_or(0) + 1 + i as i64)
            .bind(action)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn append_audits(
    tx: &mut Transaction<'static, Any>,
    entries: &[AuditEntry],
    now: i64,
) -> Result<()> {
    for entry in entries {
        append_audit(tx, entry, now).await?;
    }
    Ok(())
}

async fn append_audit(
    tx: &mut Transaction<'static, Any>,
    entry: &AuditEntry,
    now: i64,
) -> Result<AuditRecord> {
    let last = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut **tx)
        .await?;
    let prev = match &last {
        Some(row) => Some((
            row.try_get::<i64, _>("seq")?,
            row.try_get::<String, _>("hash")?,
        )),
        None => None,
    };
    let record = entry.chain(prev.as_ref().map(|(s, h)| (*s, h.as_str())), now);
    sqlx::query(
        "INSERT INTO audit_log (seq, at, actor, action, object, details, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(record.seq)
    .bind(record.at)
    .bind(&record.actor)
    .bind(&record.action)
    .bind(&record.object)
    .bind(&record.details)
    .bind(&record.prev_hash)
    .bind(&record.hash)
    .execute(&mut **tx)
    .await?;
    Ok(record)
}

/// A database URL with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
