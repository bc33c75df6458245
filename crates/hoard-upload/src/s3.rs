//! The few S3 operations hoard needs, with every answer classified.
//! SDK-level retries are off: the uploader retries itself, so it knows
//! exactly which attempt produced which answer.

use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    SharedCredentialsProvider, retry::RetryConfig, timeout::TimeoutConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use crate::config::{CredentialSource, S3Config};
use crate::metrics::Metrics;

/// Metadata key naming the host (and job) that wrote an object.
pub const WRITER_META: &str = "hoard-writer";

/// What a create-if-absent PUT came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutResult {
    /// 2xx: this request created the object.
    Created,
    /// 412, 304 (older MinIO) or 409 BlobAlreadyExists-style: it was there.
    Exists(u16),
    /// 409 ConditionalRequestConflict: a concurrent create; try again.
    Conflict,
    /// Timeout, connection failure, 5xx, throttling: may be retried, and the
    /// object may or may not have been created.
    Transient(String),
    /// Anything else (4xx): retrying will not help.
    Failed(String),
}

/// What a HEAD found.
#[derive(Clone, Debug)]
pub struct HeadInfo {
    pub len: u64,
    pub writer: Option<String>,
}

pub struct Store {
    client: Client,
    bucket: String,
}

fn status_of<E, R>(e: &SdkError<E, R>) -> Option<u16>
where
    R: HasStatus,
{
    e.raw_response().map(|r| r.status_code())
}

/// The HTTP status of a raw response, whatever its type.
pub trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

fn describe<E: ProvideErrorMetadata + std::fmt::Debug, R: std::fmt::Debug>(
    e: &SdkError<E, R>,
) -> String {
    match e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            format!(
                "{}: {}",
                err.code().unwrap_or("error"),
                err.message().unwrap_or("no message")
            )
        }
        SdkError::TimeoutError(_) => "timeout".into(),
        SdkError::DispatchFailure(d) => format!("dispatch failure: {d:?}"),
        other => format!("{other:?}").chars().take(300).collect(),
    }
}

fn classify_put<E: ProvideErrorMetadata + std::fmt::Debug>(
    e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> PutResult {
    let code = match e {
        SdkError::ServiceError(se) => se.err().code().map(str::to_string),
        _ => None,
    };
    classify(status_of(e), code.as_deref(), || describe(e))
}

/// What a refused create-if-absent PUT means. Only answers that say "the
/// object exists" count as `Exists`: 412 (S3), 304 (older MinIO) and 409
/// with an already-exists code (Azure-style). A conflicting concurrent
/// create is retried; any other 409 is a failure, never "already there".
fn classify(status: Option<u16>, code: Option<&str>, describe: impl Fn() -> String) -> PutResult {
    match status {
        Some(s @ (412 | 304)) => PutResult::Exists(s),
        Some(409) => match code {
            Some("ConditionalRequestConflict") => PutResult::Conflict,
            Some("BlobAlreadyExists" | "ObjectAlreadyExists") => PutResult::Exists(409),
            _ => PutResult::Failed(format!("HTTP 409: {}", describe())),
        },
        Some(s) if s >= 500 || s == 429 => {
            PutResult::Transient(format!("HTTP {s}: {}", describe()))
        }
        Some(s) => PutResult::Failed(format!("HTTP {s}: {}", describe())),
        None => PutResult::Transient(describe()),
    }
}

/// The provider for a credential source; `aws-config`'s for all but static
/// keys.
async fn credentials_provider(src: &CredentialSource) -> SharedCredentialsProvider {
    match src {
        CredentialSource::AccessKey {
            access_key_id,
            secret_access_key,
            session_token,
        } => SharedCredentialsProvider::new(Credentials::new(
            access_key_id.clone(),
            secret_access_key.clone(),
            session_token.clone(),
            None,
            "hoard-config",
        )),
        CredentialSource::IamRole { endpoint } => {
            let mut client = aws_config::imds::Client::builder();
            if let Some(e) = endpoint {
                // The endpoint was checked when the configuration was read.
                match client.clone().endpoint(e) {
                    Ok(c) => client = c,
                    Err(err) => {
                        tracing::error!(endpoint = %e, error = %err, "s3_proxy.iam_role_endpoint is not usable; using the default")
                    }
                }
            }
            SharedCredentialsProvider::new(
                aws_config::imds::credentials::ImdsCredentialsProvider::builder()
                    .imds_client(client.build())
                    .build(),
            )
        }
        CredentialSource::CredentialsFile { profile, file } => {
            use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
            let mut files = EnvConfigFiles::builder();
            files = match file {
                Some(f) => files.with_file(EnvConfigFileKind::Credentials, f),
                None => files.include_default_credentials_file(true),
            };
            SharedCredentialsProvider::new(
                aws_config::profile::ProfileFileCredentialsProvider::builder()
                    .profile_name(profile)
                    .profile_files(files.build())
                    .build(),
            )
        }
        CredentialSource::DefaultChain => SharedCredentialsProvider::new(
            aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                .build()
                .await,
        ),
    }
}

impl Store {
    pub async fn new(cfg: &S3Config, attempt_timeout: Duration) -> Store {
        let creds = credentials_provider(&cfg.credentials).await;
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(cfg.region.clone()))
            .endpoint_url(cfg.endpoint_url())
            .force_path_style(cfg.path_style)
            .credentials_provider(creds)
            // Only what the operation requires: some S3-compatible servers
            // reject the SDK's default streaming checksums.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .operation_attempt_timeout(attempt_timeout)
                    .build(),
            )
            .build();
        Store {
            client: Client::from_conf(conf),
            bucket: cfg.bucket.clone(),
        }
    }

    fn observe(m: &Metrics, op: &str, start: Instant, code: Option<u16>) {
        let code = code.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
        m.s3_seconds
            .with_label_values(&[op, &code])
            .observe(start.elapsed().as_secs_f64());
    }

    /// `PUT` with `If-None-Match: *`.
    pub async fn put_if_absent(
        &self,
        m: &Metrics,
        key: &str,
        body: ByteStream,
        len: u64,
        writer: &str,
    ) -> PutResult {
        let start = Instant::now();
        let r = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .if_none_match("*")
            .metadata(WRITER_META, writer)
            .content_length(len as i64)
            .body(body)
            .send()
            .await;
        match r {
            Ok(_) => {
                Self::observe(m, "put", start, Some(200));
                PutResult::Created
            }
            Err(e) => {
                Self::observe(m, "put", start, status_of(&e));
                classify_put(&e)
            }
        }
    }

    /// Multipart upload with the condition on the completion. Any failure
    /// aborts the upload, so no part is left behind and no object appears.
    pub async fn multipart_if_absent(
        &self,
        m: &Metrics,
        key: &str,
        src: &Source,
        len: u64,
        part_size: u64,
        writer: &str,
    ) -> PutResult {
        let start = Instant::now();
        let created = match self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .metadata(WRITER_META, writer)
            .send()
            .await
        {
            Ok(c) => c,
            Err(e) => {
                Self::observe(m, "create_multipart", start, status_of(&e));
                return classify_put(&e);
            }
        };
        Self::observe(m, "create_multipart", start, Some(200));
        let Some(upload_id) = created.upload_id().map(str::to_string) else {
            return PutResult::Failed("CreateMultipartUpload returned no upload id".into());
        };
        // If this future is dropped (the shutdown deadline cut the job off),
        // the guard still aborts the upload, so no half-done upload is left.
        let mut guard = AbortOnDrop {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_string(),
            upload_id: Some(upload_id.clone()),
        };
        let result = self
            .upload_parts_and_complete(m, key, &upload_id, src, len, part_size)
            .await;
        guard.upload_id = None;
        if result != PutResult::Created {
            let start = Instant::now();
            let r = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
            Self::observe(
                m,
                "abort_multipart",
                start,
                r.as_ref().err().and_then(status_of).or(Some(204)),
            );
            if let Err(e) = r {
                tracing::warn!(key, error = %describe(&e), "aborting a multipart upload failed; a bucket lifecycle rule for incomplete uploads will clean it up");
            }
        }
        result
    }

    async fn upload_parts_and_complete(
        &self,
        m: &Metrics,
        key: &str,
        upload_id: &str,
        src: &Source,
        len: u64,
        part_size: u64,
    ) -> PutResult {
        let mut parts = Vec::new();
        let mut offset = 0u64;
        let mut number = 1i32;
        while offset < len {
            let n = part_size.min(len - offset);
            let body = match src.range(offset, n).await {
                Ok(b) => b,
                Err(e) => return PutResult::Failed(e),
            };
            let start = Instant::now();
            let r = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(n as i64)
                .body(body)
                .send()
                .await;
            match r {
                Ok(out) => {
                    Self::observe(m, "upload_part", start, Some(200));
                    parts.push(
                        CompletedPart::builder()
                            .part_number(number)
                            .set_e_tag(out.e_tag().map(str::to_string))
                            .build(),
                    );
                }
                Err(e) => {
                    Self::observe(m, "upload_part", start, status_of(&e));
                    return match classify_put(&e) {
                        PutResult::Exists(_) | PutResult::Conflict => {
                            PutResult::Transient(format!("UploadPart: {}", describe(&e)))
                        }
                        other => other,
                    };
                }
            }
            offset += n;
            number += 1;
        }
        let start = Instant::now();
        let r = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .if_none_match("*")
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match r {
            Ok(_) => {
                Self::observe(m, "complete_multipart", start, Some(200));
                PutResult::Created
            }
            Err(e) => {
                Self::observe(m, "complete_multipart", start, status_of(&e));
                classify_put(&e)
            }
        }
    }

    /// `HEAD`: `Ok(None)` when the object does not exist.
    pub async fn head(&self, m: &Metrics, key: &str) -> Result<Option<HeadInfo>, String> {
        let start = Instant::now();
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => {
                Self::observe(m, "head", start, Some(200));
                Ok(Some(HeadInfo {
                    len: out.content_length().unwrap_or(0).max(0) as u64,
                    writer: out.metadata().and_then(|md| md.get(WRITER_META)).cloned(),
                }))
            }
            Err(e) => {
                let s = status_of(&e);
                Self::observe(m, "head", start, s);
                if s == Some(404) {
                    Ok(None)
                } else {
                    Err(describe(&e))
                }
            }
        }
    }

    /// `GET`: the body and its length, or `Ok(None)` when absent.
    pub async fn get(&self, m: &Metrics, key: &str) -> Result<Option<(ByteStream, u64)>, String> {
        let start = Instant::now();
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => {
                Self::observe(m, "get", start, Some(200));
                let len = out.content_length().unwrap_or(0).max(0) as u64;
                Ok(Some((out.body, len)))
            }
            Err(e) => {
                let s = status_of(&e);
                Self::observe(m, "get", start, s);
                if s == Some(404) {
                    Ok(None)
                } else {
                    Err(describe(&e))
                }
            }
        }
    }

    /// Every key under `prefix` with its size (ListObjectsV2, all pages).
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, String> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let r = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| describe(&e))?;
            for o in r.contents() {
                out.push((
                    o.key().unwrap_or_default().to_string(),
                    o.size().unwrap_or(0).max(0) as u64,
                ));
            }
            match r.next_continuation_token() {
                Some(t) if r.is_truncated().unwrap_or(false) => token = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
    }

    pub async fn delete(&self, m: &Metrics, key: &str) -> Result<(), String> {
        let start = Instant::now();
        let r = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await;
        Self::observe(
            m,
            "delete",
            start,
            r.as_ref().err().and_then(status_of).or(Some(204)),
        );
        r.map(|_| ()).map_err(|e| describe(&e))
    }
}

/// Aborts a multipart upload whose future was dropped before it finished.
struct AbortOnDrop {
    client: Client,
    bucket: String,
    key: String,
    upload_id: Option<String>,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let req = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id);
        let key = std::mem::take(&mut self.key);
        rt.spawn(async move {
            match tokio::time::timeout(Duration::from_secs(2), req.send()).await {
                Ok(Ok(_)) => {}
                _ => tracing::warn!(key, "aborting an interrupted multipart upload failed; a bucket lifecycle rule for incomplete uploads will clean it up"),
            }
        });
    }
}

/// What an upload sends: the stored file, opened afresh for every attempt
/// and part, or bytes already in memory (an action result read for its
/// reference check).
pub(crate) enum Source {
    File(std::path::PathBuf),
    Bytes(bytes::Bytes),
}

impl Source {
    /// The whole object.
    pub(crate) async fn body(&self, len: u64) -> Result<ByteStream, String> {
        self.range(0, len).await
    }

    /// `n` bytes from `offset` (a multipart part).
    pub(crate) async fn range(&self, offset: u64, n: u64) -> Result<ByteStream, String> {
        match self {
            Source::Bytes(b) => {
                let end = offset.saturating_add(n).min(b.len() as u64) as usize;
                let start = (offset as usize).min(end);
                Ok(ByteStream::from(b.slice(start..end)))
            }
            Source::File(path) => ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(Length::Exact(n))
                .build()
                .await
                .map_err(|e| format!("{}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_that_say_exists_count_as_already_exists() {
        let d = || "x".to_string();
        assert_eq!(classify(Some(412), None, d), PutResult::Exists(412));
        assert_eq!(classify(Some(304), None, d), PutResult::Exists(304));
        assert_eq!(
            classify(Some(409), Some("BlobAlreadyExists"), d),
            PutResult::Exists(409)
        );
        assert_eq!(
            classify(Some(409), Some("ConditionalRequestConflict"), d),
            PutResult::Conflict
        );
        for code in [Some("OperationAborted"), Some("BucketNotEmpty"), None] {
            assert!(
                matches!(classify(Some(409), code, d), PutResult::Failed(_)),
                "409 {code:?} is not 'already exists'"
            );
        }
        assert!(matches!(
            classify(Some(503), None, d),
            PutResult::Transient(_)
        ));
        assert!(matches!(classify(Some(403), None, d), PutResult::Failed(_)));
    }
}
