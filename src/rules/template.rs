//! Text templates over a call's fields: `"Missed call from {client} on {line}"`. Placeholders
//! are checked when the configuration loads; rendering never fails.

use std::collections::BTreeMap;

/// Every placeholder a template may use, with what it stands for (shown in errors and docs).
pub const PLACEHOLDERS: &[(&str, &str)] = &[
    ("client", "the client's number in E.164"),
    ("phone", "the same as {client}"),
    ("direction", "incoming or outgoing"),
    ("state", "Unitalk's result (ANSWER, NOANSWER, BUSY, ...)"),
    (
        "operator_name",
        "the operator's name in Bitrix24 (empty when unknown)",
    ),
    ("line", "the operator's inner line (empty when unknown)"),
    (
        "outer",
        "the company line the call came in on or went out from",
    ),
    ("group", "the last operator group (Unitalk lastGroupName)"),
    ("talk", "talk time in seconds"),
    ("duration", "whole call time in seconds"),
    (
        "started_local",
        "the call's start in the portal's time zone",
    ),
    ("call_id", "Unitalk's call id"),
    ("recording", "the recording link (empty when none)"),
    (
        "crm_link",
        "a link to the client's CRM card (empty when none is known)",
    ),
];

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Field(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl Template {
    /// Parses `source`; an unknown placeholder or an unclosed `{` is an error naming it.
    /// `{{` and `}}` stand for literal braces.
    pub fn parse(source: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("`{{{name}` is not closed with `}}`")),
                        }
                    }
                    let name = name.trim().to_string();
                    if !PLACEHOLDERS.iter().any(|(p, _)| *p == name) {
                        let known: Vec<String> = PLACEHOLDERS
                            .iter()
                            .map(|(p, _)| format!("{{{p}}}"))
                            .collect();
                        return Err(format!(
                            "unknown placeholder {{{name}}}; known ones are {}",
                            known.join(", ")
                        ));
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Field(name));
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Self {
            source: source.to_string(),
            parts,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The text with every placeholder replaced (a missing value is empty).
    pub fn render(&self, values: &BTreeMap<&'static str, String>) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => {
                    let key = if f == "phone" { "client" } else { f.as_str() };
                    out.push_str(values.get(key).map(String::as_str).unwrap_or(""));
                }
            }
        }
        out.trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_and_unknown_ones_refused() {
        let t = Template::parse("Missed call from {client} ({group}) {{x}}").unwrap();
        let mut v = BTreeMap::new();
        v.insert("client", "+380501112233".to_string());
        assert_eq!(t.render(&v), "Missed call from +380501112233 () {x}");
        assert_eq!(
            Template::parse("from {phone}").unwrap().render(&v),
            "from +380501112233"
        );
        let e = Template::parse("from {clinet}").unwrap_err();
        assert!(
            e.contains("unknown placeholder {clinet}") && e.contains("{client}"),
            "{e}"
        );
        assert!(Template::parse("from {client")
            .unwrap_err()
            .contains("not closed"));
    }
}
