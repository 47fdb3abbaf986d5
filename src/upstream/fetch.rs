//! The pull API at the upstream: manifests (read whole, size-capped), blobs (streamed, from
//! an offset) and tag lists.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::{Upstream, content_length, content_range, encoding, read_capped};
use crate::body::Body;
use crate::error::UpstreamError;
use crate::reference::{Digest, Reference, Repository};

/// A manifest as the upstream sent it.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// `Content-Type`.
    pub media_type: String,
    /// `Docker-Content-Digest`, when sent and well-formed.
    pub digest: Option<Digest>,
    /// The body; empty for HEAD.
    pub body: Bytes,
}

impl Upstream {
    /// Fetches a manifest (GET reads the body, capped at `max_manifest_size`; HEAD does not).
    pub async fn manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
        accept: &str,
        head: bool,
    ) -> Result<FetchedManifest, UpstreamError> {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(accept) {
            headers.insert(header::ACCEPT, v);
        }
        let method = if head { Method::HEAD } else { Method::GET };
        let resp = self
            .request(
                &method,
                repo,
                &format!("/v2/{repo}/manifests/{reference}"),
                headers,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(UpstreamError::Status(resp.status().as_u16()));
        }
        let h = resp.headers();
        let media_type = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
            .unwrap_or_default();
        let digest = h
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok());
        let declared = content_length(h);
        let headers = h.clone();
        if declared.is_some_and(|n| n > self.max_manifest_size) {
            return Err(UpstreamError::Invalid(format!(
                "manifest larger than {} bytes",
                self.max_manifest_size
            )));
        }
        let body = if head {
            Bytes::new()
        } else {
            let body = read_capped(resp.into_body(), self.max_manifest_size, self.read_idle)
                .await
                .map_err(|e| e.at(&self.name))?;
            if declared.is_some_and(|n| n != body.len() as u64) {
                return Err(UpstreamError::Invalid(
                    "manifest body does not match Content-Length".into(),
                ));
            }
            self.stats.fetched_manifest(body.len() as u64);
            encoding::decode(&headers, body, self.max_manifest_size)?
        };
        Ok(FetchedManifest {
            media_type,
            digest,
            body,
        })
    }

    /// A blob's bytes from byte `start` on (GET, redirects followed; `Range: bytes=start-`
    /// when `start > 0`). The answer may start at 0 when the upstream ignored the range:
    /// `offset` says where its body starts. Any other status than 200 (or 206 to a range) is
    /// an error.
    pub async fn blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        start: u64,
    ) -> Result<BlobAnswer, UpstreamError> {
        self.blob_exchange(&Method::GET, repo, digest, start).await
    }

    /// Asks whether a blob exists and how large it is (HEAD): the same exchange as
    /// [`Upstream::blob`], without a body.
    pub async fn blob_size(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Option<u64>, UpstreamError> {
        Ok(self
            .blob_exchange(&Method::HEAD, repo, digest, 0)
            .await?
            .total)
    }

    async fn blob_exchange(
        &self,
        method: &Method,
        repo: &Repository,
        digest: &Digest,
        start: u64,
    ) -> Result<BlobAnswer, UpstreamError> {
        let mut headers = HeaderMap::new();
        if start > 0 {
            headers.insert(
                header::RANGE,
                HeaderValue::from_str(&format!("bytes={start}-"))
                    .map_err(|e| UpstreamError::Invalid(e.to_string()))?,
            );
        }
        self.learn_scheme(repo).await;
        let resp = self
            .request(method, repo, &format!("/v2/{repo}/blobs/{digest}"), headers)
            .await?;
        let (parts, body) = resp.into_parts();
        match parts.status {
            StatusCode::OK => Ok(BlobAnswer {
                total: content_length(&parts.headers),
                offset: 0,
                body,
            }),
            StatusCode::PARTIAL_CONTENT if start > 0 => {
                let Some((from, total)) = content_range(&parts.headers) else {
                    return Err(UpstreamError::Invalid(
                        "range answer without a valid Content-Range".into(),
                    ));
                };
                if from != start {
                    return Err(UpstreamError::Invalid(
                        "range answer does not start where asked".into(),
                    ));
                }
                Ok(BlobAnswer {
                    total,
                    offset: from,
                    body,
                })
            }
            s => Err(UpstreamError::Status(s.as_u16())),
        }
    }

    /// Lists tags, passing `query` (`n`, `last`) through. Returns the body and `Link` header.
    pub async fn tags(
        &self,
        repo: &Repository,
        query: &str,
    ) -> Result<(Bytes, Option<String>), UpstreamError> {
        let path = if query.is_empty() {
            format!("/v2/{repo}/tags/list")
        } else {
            format!("/v2/{repo}/tags/list?{query}")
        };
        let resp = self
            .request(&Method::GET, repo, &path, HeaderMap::new())
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(UpstreamError::Status(resp.status().as_u16()));
        }
        let link = resp
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_capped(resp.into_body(), self.max_manifest_size, self.read_idle)
            .await
            .map_err(|e| e.at(&self.name))?;
        Ok((body, link))
    }
}

/// A blob answer from the upstream: where its body starts and how long the whole blob is.
pub struct BlobAnswer {
    /// Size of the whole blob, when the upstream said.
    pub total: Option<u64>,
    /// Offset in the blob of the body's first byte: 0, or the start asked for when the
    /// upstream honoured the range.
    pub offset: u64,
    /// The body; empty for HEAD.
    pub body: Body,
}
