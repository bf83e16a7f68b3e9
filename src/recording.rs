//! `recordings.delivery = "upload"`: ubsync downloads a call's recording from the link Unitalk
//! gave (read in chunks, bounded by `recordings.max_bytes`), checks that it is a non-empty mp3 or
//! wav, and hands the bytes to `attachRecord` as `FILE_CONTENT`, so Bitrix24 never depends on a
//! link that needs the API key or expires. A failed download is retried by a later pass, never
//! taken as "no recording".

use secrecy::ExposeSecret;

use crate::config::Config;

/// A downloaded recording.
#[derive(Debug)]
pub struct Recording {
    pub bytes: Vec<u8>,
    /// `mp3` or `wav`, from the content.
    pub extension: &'static str,
}

/// Why a recording could not be downloaded.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Worth trying again later (HTTP error, network, a body that is not audio yet).
    #[error("{0}")]
    Retry(String),
    /// Will not change by retrying (too large, not an http(s) link).
    #[error("{0}")]
    Refused(String),
}

/// What audio format `bytes` start with: ID3 or an MPEG frame sync (mp3), RIFF…WAVE (wav).
pub fn sniff(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"ID3")
        || (bytes.len() >= 2 && bytes[0] == 0xFF && bytes[1] & 0xE0 == 0xE0)
    {
        Some("mp3")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WAVE" {
        Some("wav")
    } else {
        None
    }
}

/// A client for downloads: no redirect to another scheme, a timeout of its own.
pub fn client(cfg: &Config) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(cfg.unitalk.request_timeout * 4)
        .connect_timeout(std::time::Duration::from_secs(15))
        .redirect(reqwest::redirect::Policy::limited(5))
        .user_agent(concat!("ubsync/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

/// Downloads `link`. Never logs the link's query (it may carry a token).
#[allow(clippy::disallowed_methods)] // a recording download from Unitalk's file server
pub async fn fetch(
    http: &reqwest::Client,
    cfg: &Config,
    link: &str,
) -> Result<Recording, FetchError> {
    let url = url::Url::parse(link)
        .map_err(|e| FetchError::Refused(format!("the recording link is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(FetchError::Refused(format!(
            "the recording link is not http(s) but {}",
            url.scheme()
        )));
    }
    let host = crate::netdiag::host_of(&url);
    let mut req = http.get(url);
    if cfg.recordings.send_api_key {
        req = req.header("Authorization", cfg.unitalk.api_key.expose_secret());
    }
    let mut resp = req.send().await.map_err(|e| {
        FetchError::Retry(format!("download from {host} failed: {}", e.without_url()))
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(FetchError::Retry(format!(
            "download from {host} answered HTTP {}{}",
            status.as_u16(),
            if matches!(status.as_u16(), 401 | 403) && !cfg.recordings.send_api_key {
                " (if the links need the API key, set recordings.send_api_key = true)"
            } else {
                ""
            }
        )));
    }
    let max = cfg.recordings.max_bytes;
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(FetchError::Refused(format!(
            "the recording is larger than recordings.max_megabytes ({} MB)",
            max / 1024 / 1024
        )));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| {
        FetchError::Retry(format!(
            "download from {host} broke off: {}",
            e.without_url()
        ))
    })? {
        if bytes.len() as u64 + chunk.len() as u64 > max {
            return Err(FetchError::Refused(format!(
                "the recording is larger than recordings.max_megabytes ({} MB)",
                max / 1024 / 1024
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    if bytes.is_empty() {
        return Err(FetchError::Retry(format!("{host} sent an empty recording")));
    }
    let Some(extension) = sniff(&bytes) else {
        return Err(FetchError::Retry(format!(
            "{host} sent {} bytes that are not mp3 or wav",
            bytes.len()
        )));
    };
    Ok(Recording { bytes, extension })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mp3_and_wav_are_told_from_pages_and_empty_bodies() {
        assert_eq!(sniff(b"ID3\x04\x00rest"), Some("mp3"));
        assert_eq!(sniff(&[0xFF, 0xFB, 0x90, 0x00]), Some("mp3"));
        assert_eq!(sniff(b"RIFF\x24\x00\x00\x00WAVEfmt "), Some("wav"));
        assert_eq!(sniff(b"<html>404</html>"), None);
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(b"{\"status\":\"Error\"}"), None);
    }
}
