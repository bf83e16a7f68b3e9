//! What a failed HTTP request says about the configuration: a name that does not resolve, TLS
//! that does not work (https spoken to an http server, a bad certificate) or a server that is not
//! the service at all are mistakes an admin must fix (exit 2); a refused connection or a timeout
//! may pass. Shared by the Bitrix24 and the Unitalk client.

use std::error::Error as _;

/// Why a request failed before an HTTP answer arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The host name does not resolve.
    Dns,
    /// The TLS handshake failed.
    Tls,
    /// Nothing listens on the port.
    Refused,
    /// No answer in time.
    Timeout,
    /// Anything else (reset, broken pipe, protocol error).
    Other,
}

impl Failure {
    /// Whether an admin must change the configuration before this can work.
    pub fn is_configuration(self) -> bool {
        matches!(self, Failure::Dns | Failure::Tls)
    }
}

/// Classifies a transport error by walking its causes.
pub fn classify(e: &reqwest::Error) -> Failure {
    if e.is_timeout() {
        return Failure::Timeout;
    }
    let mut text = String::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return Failure::Refused;
            }
            if io.kind() == std::io::ErrorKind::TimedOut {
                return Failure::Timeout;
            }
        }
        text.push_str(&s.to_string().to_lowercase());
        text.push('\n');
        source = s.source();
    }
    classify_text(&text)
}

fn classify_text(text: &str) -> Failure {
    if text.contains("dns error")
        || text.contains("failed to lookup address")
        || text.contains("name or service not known")
        || text.contains("no address associated")
        || text.contains("nodename nor servname")
    {
        Failure::Dns
    } else if text.contains("tls")
        || text.contains("certificate")
        || text.contains("ssl")
        || text.contains("handshake")
        || text.contains("invalidcontenttype")
        || text.contains("corrupt message")
    {
        Failure::Tls
    } else if text.contains("connection refused") {
        Failure::Refused
    } else if text.contains("timed out") {
        Failure::Timeout
    } else {
        Failure::Other
    }
}

/// `host[:port]` of a URL: what a message may name (a webhook's path holds its secret code).
pub fn host_of(url: &url::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => "(no host)".into(),
    }
}

/// One sentence for an admin: what failed at `host`, and what to check in `key`.
pub fn explain(failure: Failure, host: &str, key: &str, timeout_secs: u64) -> String {
    match failure {
        Failure::Dns => format!("the host name {host} does not resolve (DNS); check {key} for a typo"),
        Failure::Tls => format!("TLS with {host} failed (https spoken to a plain-http server, or a certificate that is not valid); check the scheme and host in {key}"),
        Failure::Refused => format!("{host} refused the connection (nothing listens on that port); if it persists, check the port in {key}"),
        Failure::Timeout => format!("{host} did not answer: timed out after {timeout_secs} s"),
        Failure::Other => format!("the connection to {host} failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_of_the_resolver_and_of_tls_are_recognised() {
        assert_eq!(
            classify_text(
                "dns error: failed to lookup address information: name or service not known"
            ),
            Failure::Dns
        );
        assert_eq!(
            classify_text("received corrupt message of type invalidcontenttype"),
            Failure::Tls
        );
        assert_eq!(
            classify_text("invalid peer certificate: unknownissuer"),
            Failure::Tls
        );
        assert_eq!(
            classify_text("tcp connect error: connection refused (os error 111)"),
            Failure::Refused
        );
        assert_eq!(classify_text("connection reset by peer"), Failure::Other);
        assert!(Failure::Dns.is_configuration() && Failure::Tls.is_configuration());
        assert!(!Failure::Refused.is_configuration() && !Failure::Timeout.is_configuration());
    }
}
