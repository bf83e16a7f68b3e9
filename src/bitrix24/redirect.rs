//! Which redirects ubsync follows (pure).
//!
//! A portal that changed its address answers 3xx with the new one (§1.2). Following any redirect
//! would hand the webhook code or the access token to whoever answers, so a redirect is followed
//! only when all of these hold:
//! - the target is https, or both ends are http and plain http is allowed for this portal
//!   (loopback, or `allow_insecure_http`): never a downgrade from https to http;
//! - the target names no user or password;
//! - the target host is the configured host, or shares its registrable domain
//!   (`a.example.com` → `b.example.com`), or both are Bitrix24 cloud portals (`*.bitrix24.<tld>`,
//!   e.g. a portal renamed or moved between regions); an IP address only to itself.
//!
//! Everything else is a configuration problem an admin must look at (exit 2).

use url::{Host, Url};

/// The reason phrase of a redirect status, for messages.
pub fn status_words(status: u16) -> &'static str {
    match status {
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        _ => "Redirect",
    }
}

/// Whether a redirect with this status should be remembered for later requests.
pub fn is_permanent(status: u16) -> bool {
    // Bitrix24 answers a domain change with 302 (§1.2), so 302 counts as a move here.
    matches!(status, 301 | 302 | 308)
}

/// `scheme://host[:port]`: the part of a URL that carries no secret.
pub fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

fn registrable(host: &str) -> Option<String> {
    psl::domain_str(host).map(|d| d.to_ascii_lowercase())
}

fn is_bitrix24_cloud(host: &str) -> bool {
    // The registrable domain is `bitrix24` plus a public suffix: bitrix24.ru, bitrix24.com.br…
    registrable(host).is_some_and(|d| d.starts_with("bitrix24."))
}

/// Whether plain http is acceptable for `url` (a loopback host).
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Checks a redirect from `from` (a URL ubsync requested, on `configured`'s portal) to `to`.
/// `allow_http`: whether plain http is allowed for this portal at all. `Err` says why not.
pub fn check(configured: &Url, from: &Url, to: &Url, allow_http: bool) -> Result<(), String> {
    match (from.scheme(), to.scheme()) {
        (_, "https") => {}
        ("http", "http") if allow_http || (is_loopback(configured) && is_loopback(to)) => {}
        ("https", "http") => return Err("it downgrades https to plain http".into()),
        (_, "http") => return Err("it points at plain http".into()),
        (_, other) => return Err(format!("it points at a `{other}:` address")),
    }
    if !to.username().is_empty() || to.password().is_some() {
        return Err("it carries a user name or password".into());
    }
    let (Some(want), Some(got)) = (configured.host(), to.host()) else {
        return Err("it names no host".into());
    };
    let same = match (&want, &got) {
        (Host::Domain(a), Host::Domain(b)) => {
            a.eq_ignore_ascii_case(b)
                || registrable(a).is_some_and(|r| Some(r) == registrable(b))
                || (is_bitrix24_cloud(a) && is_bitrix24_cloud(b))
        }
        (a, b) => a == b,
    };
    if !same {
        return Err(format!(
            "{} is not the configured portal's domain",
            got.to_string().to_ascii_lowercase()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn redirect_policy_table() {
        let portal = u("https://acme.bitrix24.ua");
        let from = u("https://acme.bitrix24.ua/rest/batch");
        let cases: &[(&str, bool)] = &[
            ("https://acme.bitrix24.ua/rest/batch", true),
            ("https://acme-new.bitrix24.ua/rest/batch", true),
            ("https://acme.bitrix24.kz/rest/batch", true),
            ("https://acme.bitrix24.com.br/rest/batch", true),
            ("http://acme.bitrix24.ua/rest/batch", false),
            ("https://evil.example/rest/batch", false),
            ("https://bitrix24.ua.evil.example/rest/batch", false),
            ("https://user:pw@acme.bitrix24.ua/rest/batch", false),
            ("ftp://acme.bitrix24.ua/rest/batch", false),
        ];
        for (to, ok) in cases {
            assert_eq!(check(&portal, &from, &u(to), false).is_ok(), *ok, "{to}");
        }
        // A self-hosted portal: the same registrable domain only.
        let own = u("https://crm.example.com");
        let from = u("https://crm.example.com/rest/x");
        assert!(check(&own, &from, &u("https://crm2.example.com/rest/x"), false).is_ok());
        assert!(check(&own, &from, &u("https://crm.example.org/rest/x"), false).is_err());
        assert!(check(&own, &from, &u("https://acme.bitrix24.ua/rest/x"), false).is_err());
        // Loopback over http (the simulators): same address only.
        let lo = u("http://127.0.0.1:4000");
        let from = u("http://127.0.0.1:4000/rest/x");
        assert!(check(&lo, &from, &u("http://127.0.0.1:5000/rest/x"), false).is_ok());
        assert!(check(&lo, &from, &u("http://127.0.0.2:5000/rest/x"), false).is_err());
        assert!(check(
            &lo,
            &u("https://127.0.0.1/x"),
            &u("http://127.0.0.1/x"),
            true
        )
        .is_err());
    }

    #[test]
    fn status_words_are_right() {
        assert_eq!(status_words(301), "Moved Permanently");
        assert_eq!(status_words(302), "Found");
        assert_eq!(status_words(307), "Temporary Redirect");
        assert_eq!(status_words(308), "Permanent Redirect");
        assert!(is_permanent(308) && !is_permanent(307));
        assert_eq!(
            origin(&u("https://a.b:8443/rest/1/code/")),
            "https://a.b:8443"
        );
    }
}
