//! The `[rules]` section as read, and its validation into [`crate::rules::Rules`].

use std::collections::HashSet;
use std::path::Path;

use chrono::{NaiveDate, NaiveTime};
use chrono_tz::Tz;
use regex::Regex;
use serde::Deserialize;

use super::validate::Validator;
use crate::rules::{
    AfterHours, Cond, Fields, Filter, Hours, InvalidNumber, Leads, LeadsFor, Lines, Notify,
    NumberSet, Responsible, Rewrite, Rules, Template, Who,
};
use crate::sync::call::Way;

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawRules {
    pub(super) invalid_number: Option<String>,
    #[serde(default)]
    pub(super) rewrite: Vec<RawRewrite>,
    #[serde(default)]
    pub(super) rewrite_line: Vec<RawRewrite>,
    pub(super) crm_order: Option<Vec<String>>,
    #[serde(default)]
    pub(super) skip: Vec<RawFilter>,
    #[serde(default)]
    pub(super) skip_task: Vec<RawFilter>,
    pub(super) hours: Option<RawHours>,
    pub(super) responsible: Option<RawResponsible>,
    pub(super) leads: Option<RawLeads>,
    #[serde(default)]
    pub(super) fields: RawFields,
    pub(super) notify: Option<RawNotify>,
    pub(super) script: Option<String>,
    pub(super) script_max_operations: Option<i64>,
    pub(super) lines: Option<RawLines>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawLines {
    pub(super) offline: Option<Vec<String>>,
    pub(super) alert_after: Option<String>,
    pub(super) supervisors: Option<Vec<i64>>,
    pub(super) skip_offline_operator: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawNotify {
    pub(super) missed: Option<bool>,
    #[serde(default)]
    pub(super) supervisors: Vec<i64>,
    pub(super) message: Option<String>,
    pub(super) per_client: Option<String>,
    pub(super) max_age: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawFields {
    #[serde(default)]
    pub(super) task: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub(super) activity: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub(super) lead: std::collections::BTreeMap<String, String>,
}

/// Fields ubsync sets itself (templates and rules shape them instead).
const OWN_FIELDS: &[(&str, &[&str])] = &[
    (
        "task",
        &[
            "TITLE",
            "DESCRIPTION",
            "RESPONSIBLE_ID",
            "DEADLINE",
            "XML_ID",
            "UF_CRM_TASK",
        ],
    ),
    (
        "activity",
        &[
            "OWNER_TYPE_ID",
            "OWNER_ID",
            "TYPE_ID",
            "COMMUNICATIONS",
            "SUBJECT",
            "START_TIME",
            "END_TIME",
            "COMPLETED",
            "DIRECTION",
            "RESPONSIBLE_ID",
            "DESCRIPTION",
            "DESCRIPTION_TYPE",
            "ORIGINATOR_ID",
            "ORIGIN_ID",
        ],
    ),
    (
        "lead",
        &[
            "TITLE",
            "PHONE",
            "SOURCE_ID",
            "ASSIGNED_BY_ID",
            "ORIGINATOR_ID",
            "ORIGIN_ID",
        ],
    ),
];

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawResponsible {
    pub(super) order: Option<Vec<String>>,
    #[serde(default)]
    pub(super) lines: std::collections::BTreeMap<String, i64>,
    #[serde(default)]
    pub(super) groups: std::collections::BTreeMap<String, i64>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawLeads {
    pub(super) create: Option<String>,
    pub(super) source: Option<String>,
    pub(super) title: Option<String>,
}

/// What the keys older than `[rules.leads]` said, used when it is absent.
pub(super) struct LegacyLeads {
    pub(super) create: bool,
    pub(super) create_key: &'static str,
    pub(super) title: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawRewrite {
    pub(super) pattern: Option<String>,
    pub(super) replace: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawFilter {
    pub(super) name: Option<String>,
    #[serde(rename = "match")]
    pub(super) combine: Option<String>,
    pub(super) direction: Option<Vec<String>>,
    pub(super) state: Option<Vec<String>>,
    pub(super) client: Option<Vec<String>>,
    pub(super) client_file: Option<String>,
    pub(super) inner_line: Option<Vec<String>>,
    pub(super) outer_line: Option<Vec<String>>,
    pub(super) group: Option<Vec<String>>,
    pub(super) talk_below: Option<i64>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawHours {
    pub(super) timezone: Option<String>,
    pub(super) days: Option<Vec<String>>,
    pub(super) open: Option<String>,
    pub(super) close: Option<String>,
    #[serde(default)]
    pub(super) holidays: Vec<String>,
    pub(super) after_hours: Option<String>,
    /// Other calendars per operator group; unset keys come from the portal's calendar.
    #[serde(default)]
    pub(super) groups: std::collections::BTreeMap<String, RawHours>,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Validator {
    /// A template, checked for unknown placeholders.
    pub(super) fn template(&mut self, key: &str, raw: Option<String>, default: &str) -> Template {
        let raw = raw.unwrap_or_else(|| default.to_string());
        match Template::parse(&raw) {
            Ok(t) if !raw.trim().is_empty() => t,
            Ok(_) => {
                self.fail(
                    key,
                    "empty",
                    format!("write a template such as \"{default}\""),
                );
                Template::parse(default).expect("default template")
            }
            Err(e) => {
                self.fail(key, e, "fix the placeholder (see `ubsync.example.toml`)");
                Template::parse(default).expect("default template")
            }
        }
    }

    fn numbers(&mut self, key: &str, entries: &[String], set: &mut NumberSet) {
        for e in entries {
            if let Err(problem) = set.add(e) {
                self.fail(
                    key,
                    problem,
                    "write \"+380501112233\", \"prefix:+7\" or \"regex:^\\\\+7\"",
                );
            }
        }
    }

    fn filter(&mut self, key: &str, i: usize, raw: RawFilter, base_dir: &Path) -> Option<Filter> {
        let at = |k: &str| format!("{key}[{i}].{k}");
        let name = raw.name.unwrap_or_else(|| format!("{key} #{}", i + 1));
        let any = match raw.combine.as_deref().unwrap_or("all") {
            "all" => false,
            "any" => true,
            other => {
                self.fail(
                    &at("match"),
                    format!("`{other}` is not a combination"),
                    "use \"all\" or \"any\"",
                );
                false
            }
        };
        let mut conds = Vec::new();
        if let Some(d) = raw.direction {
            let mut ways = Vec::new();
            for w in d {
                match w.to_lowercase().as_str() {
                    "in" | "incoming" => ways.push(Way::In),
                    "out" | "outgoing" => ways.push(Way::Out),
                    other => self.fail(
                        &at("direction"),
                        format!("`{other}` is not a direction"),
                        "use \"in\" or \"out\"",
                    ),
                }
            }
            conds.push(Cond::Direction(ways));
        }
        if let Some(s) = raw.state {
            conds.push(Cond::State(
                s.iter().map(|s| s.trim().to_uppercase()).collect(),
            ));
        }
        if raw.client.is_some() || raw.client_file.is_some() {
            let mut set = NumberSet::default();
            self.numbers(
                &at("client"),
                raw.client.as_deref().unwrap_or(&[]),
                &mut set,
            );
            if let Some(file) = raw.client_file {
                let path = base_dir.join(&file);
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        let entries: Vec<String> = text
                            .lines()
                            .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
                            .filter(|l| !l.is_empty())
                            .collect();
                        self.numbers(&at("client_file"), &entries, &mut set);
                    }
                    Err(e) => self.fail(
                        &at("client_file"),
                        format!("cannot read {} ({e})", path.display()),
                        "point it at a readable file with one number, prefix: or regex: per line",
                    ),
                }
            }
            conds.push(Cond::Client(set));
        }
        if let Some(l) = raw.inner_line {
            conds.push(Cond::InnerLine(
                l.iter().map(|l| l.trim().to_string()).collect(),
            ));
        }
        if let Some(o) = raw.outer_line {
            let mut set = NumberSet::default();
            for e in &o {
                // A site name (web callbacks) is matched as written; numbers by their digits.
                if crate::rules::digits(e).is_empty() && !e.starts_with("regex:") {
                    set.exact.insert(e.trim().to_lowercase());
                } else if let Err(problem) = set.add(e) {
                    self.fail(
                        &at("outer_line"),
                        problem,
                        "write a number, \"prefix:...\" or \"regex:...\"",
                    );
                }
            }
            conds.push(Cond::OuterLine(set));
        }
        if let Some(g) = raw.group {
            conds.push(Cond::Group(
                g.iter().map(|g| g.trim().to_string()).collect(),
            ));
        }
        if let Some(t) = raw.talk_below {
            if !(1..=86_400).contains(&t) {
                self.fail(
                    &at("talk_below"),
                    format!("{t} is out of range"),
                    "use seconds from 1 to 86400",
                );
            } else {
                conds.push(Cond::TalkBelow(t as u32));
            }
        }
        if conds.is_empty() {
            self.fail(
                &format!("{key}[{i}]"),
                format!("rule \"{name}\" has no condition and would match every call"),
                "add direction, state, client, inner_line, outer_line, group or talk_below",
            );
            return None;
        }
        Some(Filter { name, any, conds })
    }

    /// The portal's calendar and the groups' (each group's unset keys taken from the portal's).
    fn calendars(
        &mut self,
        raw: Option<RawHours>,
        default_tz: Tz,
    ) -> (Option<Hours>, std::collections::HashMap<String, Hours>) {
        let Some(mut raw) = raw else {
            return (None, Default::default());
        };
        let groups = std::mem::take(&mut raw.groups);
        let mut by_group = std::collections::HashMap::new();
        for (name, g) in groups {
            let merged = RawHours {
                timezone: g.timezone.or(raw.timezone.clone()),
                days: g.days.or(raw.days.clone()),
                open: g.open.or(raw.open.clone()),
                close: g.close.or(raw.close.clone()),
                holidays: if g.holidays.is_empty() {
                    raw.holidays.clone()
                } else {
                    g.holidays
                },
                after_hours: g.after_hours.or(raw.after_hours.clone()),
                groups: Default::default(),
            };
            if let Some(h) = self.hours(merged, default_tz) {
                by_group.insert(name.trim().to_lowercase(), h);
            }
        }
        (self.hours(raw, default_tz), by_group)
    }

    fn hours(&mut self, raw: RawHours, default_tz: Tz) -> Option<Hours> {
        let tz = match raw.timezone {
            Some(t) => self.tz("rules.hours.timezone", Some(t), "UTC"),
            None => default_tz,
        };
        let mut days = [false; 7];
        let listed = raw.days.unwrap_or_else(|| {
            vec![
                "mon".into(),
                "tue".into(),
                "wed".into(),
                "thu".into(),
                "fri".into(),
            ]
        });
        for d in listed {
            let d = d.trim().to_lowercase();
            match DAYS.iter().position(|x| d.starts_with(x)) {
                Some(i) => days[i] = true,
                None => self.fail(
                    "rules.hours.days",
                    format!("`{d}` is not a weekday"),
                    "use mon, tue, wed, thu, fri, sat, sun",
                ),
            }
        }
        let mut time = |key: &str, raw: Option<String>, default: &str| {
            let raw = raw.unwrap_or_else(|| default.to_string());
            NaiveTime::parse_from_str(raw.trim(), "%H:%M").unwrap_or_else(|_| {
                self.fail(
                    key,
                    format!("`{raw}` is not a time of day"),
                    "write it like \"09:00\"",
                );
                NaiveTime::MIN
            })
        };
        let open = time("rules.hours.open", raw.open, "09:00");
        let close = time("rules.hours.close", raw.close, "18:00");
        if close <= open {
            self.fail(
                "rules.hours.close",
                "closes before it opens",
                "set close later than open (hours past midnight are not supported)",
            );
        }
        let mut holidays = HashSet::new();
        for h in raw.holidays {
            match NaiveDate::parse_from_str(h.trim(), "%Y-%m-%d") {
                Ok(d) => {
                    holidays.insert(d);
                }
                Err(_) => self.fail(
                    "rules.hours.holidays",
                    format!("`{h}` is not a date"),
                    "write dates like \"2026-12-25\"",
                ),
            }
        }
        let after_hours = match raw.after_hours.as_deref().unwrap_or("deadline") {
            "deadline" => AfterHours::Deadline,
            "wait" => AfterHours::Wait,
            other => {
                self.fail("rules.hours.after_hours", format!("`{other}` is not a choice"), "use \"deadline\" (create now, deadline from the opening) or \"wait\" (create when the office opens)");
                AfterHours::Deadline
            }
        };
        if !days.iter().any(|d| *d) {
            self.fail(
                "rules.hours.days",
                "no working day",
                "list at least one day",
            );
        }
        Some(Hours {
            tz,
            days,
            open,
            close,
            holidays,
            after_hours,
        })
    }

    fn responsible(&mut self, raw: Option<RawResponsible>) -> Responsible {
        let mut r = Responsible::default();
        let Some(raw) = raw else { return r };
        if let Some(order) = raw.order {
            let mut out = Vec::new();
            for w in order {
                match w.trim().to_lowercase().as_str() {
                    "crm" => out.push(Who::Crm),
                    "operator" => out.push(Who::Operator),
                    "line" => out.push(Who::Line),
                    "group" => out.push(Who::Group),
                    "default" => out.push(Who::Default),
                    other => self.fail(
                        "rules.responsible.order",
                        format!("`{other}` is not a source"),
                        "list some of \"crm\", \"operator\", \"line\", \"group\", \"default\"",
                    ),
                }
            }
            if out.is_empty() {
                self.fail(
                    "rules.responsible.order",
                    "empty",
                    "list at least \"default\"",
                );
            }
            r.order = out;
        }
        for (line, user) in raw.lines {
            let d = crate::rules::digits(&line);
            if d.is_empty() || user < 1 {
                self.fail(
                    &format!("rules.responsible.lines.{line}"),
                    "needs a company phone number and a Bitrix24 user id",
                    "write \"380443334455\" = 12",
                );
            } else {
                r.lines.insert(d, user);
            }
        }
        for (group, user) in raw.groups {
            if user < 1 {
                self.fail(
                    &format!("rules.responsible.groups.{group}"),
                    format!("{user} is not a Bitrix24 user id"),
                    "write \"Sales\" = 15",
                );
            } else {
                r.groups.insert(group.trim().to_lowercase(), user);
            }
        }
        r
    }

    fn field_map(
        &mut self,
        kind: &str,
        raw: std::collections::BTreeMap<String, String>,
    ) -> Vec<(String, Template)> {
        let own = OWN_FIELDS
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, f)| *f)
            .unwrap_or(&[]);
        let mut out = Vec::new();
        for (name, template) in raw {
            let key = format!("rules.fields.{kind}.{name}");
            let upper = name.to_uppercase();
            if upper != name
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                || !name.starts_with(|c: char| c.is_ascii_alphabetic())
            {
                self.fail(
                    &key,
                    "is not a Bitrix24 field name",
                    "write it in upper case, like UF_CRM_1700000000",
                );
                continue;
            }
            if own.contains(&name.as_str()) {
                self.fail(&key, "is a field ubsync sets itself", "shape it with the templates and rules instead ([tasks] title, [rules.leads] title, ...)");
                continue;
            }
            out.push((name, self.template(&key, Some(template), "{client}")));
        }
        out
    }

    fn lines(&mut self, raw: Option<RawLines>, notify: &Notify) -> Lines {
        let mut l = Lines::default();
        let Some(raw) = raw else { return l };
        if let Some(o) = raw.offline {
            l.offline = o.iter().map(|s| s.trim().to_uppercase()).collect();
        }
        if let Some(a) = raw.alert_after {
            l.alert_after = chrono::Duration::from_std(self.duration(
                "rules.lines.alert_after",
                Some(a),
                "10m",
                ("1m", "7days"),
            ))
            .ok();
        }
        l.supervisors = raw
            .supervisors
            .unwrap_or_else(|| notify.supervisors.clone());
        if l.alert_after.is_some() && l.supervisors.is_empty() {
            self.fail(
                "rules.lines.supervisors",
                "line alerts need someone to tell",
                "list Bitrix24 user ids, e.g. supervisors = [1] (or set rules.notify.supervisors)",
            );
        }
        l.skip_offline_operator = raw.skip_offline_operator.unwrap_or(false);
        l
    }

    fn notify(&mut self, raw: Option<RawNotify>) -> Notify {
        let d = Notify::default();
        let Some(raw) = raw else { return d };
        for u in &raw.supervisors {
            if *u < 1 {
                self.fail(
                    "rules.notify.supervisors",
                    format!("{u} is not a Bitrix24 user id"),
                    "list user ids such as [1, 5]",
                );
            }
        }
        let dur = |v: &mut Self, key: &str, raw: Option<String>, default: &str| {
            chrono::Duration::from_std(v.duration(key, raw, default, ("0s", "30days")))
                .unwrap_or_default()
        };
        Notify {
            missed: raw.missed.unwrap_or(true),
            supervisors: raw.supervisors,
            message: self.template("rules.notify.message", raw.message, d.message.source()),
            per_client: dur(self, "rules.notify.per_client", raw.per_client, "30m"),
            max_age: dur(self, "rules.notify.max_age", raw.max_age, "2h"),
        }
    }

    fn leads(&mut self, raw: Option<RawLeads>, legacy: LegacyLeads) -> Leads {
        let raw = raw.unwrap_or_default();
        let create = match raw.create.as_deref() {
            None => {
                if legacy.create {
                    LeadsFor::All
                } else {
                    LeadsFor::None
                }
            }
            Some("all") => LeadsFor::All,
            Some("incoming") => LeadsFor::Incoming,
            Some("outgoing") => LeadsFor::Outgoing,
            Some("none") => LeadsFor::None,
            Some(other) => {
                self.fail(
                    "rules.leads.create",
                    format!("`{other}` is not a choice"),
                    format!(
                        "use \"all\", \"incoming\", \"outgoing\" or \"none\" (it replaces `{}`)",
                        legacy.create_key
                    ),
                );
                LeadsFor::All
            }
        };
        let (key, title) = match (raw.title, legacy.title) {
            (Some(t), _) => ("rules.leads.title", Some(t)),
            (None, Some(t)) => ("activity.lead_title", Some(t)),
            (None, None) => ("rules.leads.title", None),
        };
        let source = raw.source.unwrap_or_else(|| "CALL".into());
        if source.trim().is_empty() {
            self.fail(
                "rules.leads.source",
                "empty",
                "use a source id such as \"CALL\"",
            );
        }
        Leads {
            create,
            source,
            title: self.template(key, title, "Call from {client}"),
        }
    }

    fn rewrites(&mut self, at: &str, raw: Vec<RawRewrite>) -> Vec<Rewrite> {
        let mut out = Vec::new();
        for (i, r) in raw.into_iter().enumerate() {
            let key = format!("{at}[{i}]");
            match (r.pattern, r.replace) {
                (Some(p), Some(replace)) => match Regex::new(&p) {
                    Ok(pattern) => out.push(Rewrite { pattern, replace }),
                    Err(e) => self.fail(
                        &format!("{key}.pattern"),
                        format!("`{p}` is not a regular expression ({e})"),
                        "fix the expression",
                    ),
                },
                _ => self.fail(
                    &key,
                    "needs both `pattern` and `replace`",
                    "write pattern = \"^8(0\\\\d{9})$\", replace = \"+38$1\"",
                ),
            }
        }
        out
    }

    pub(super) fn rules(
        &mut self,
        raw: RawRules,
        default_tz: Tz,
        base_dir: &Path,
        legacy: LegacyLeads,
    ) -> Rules {
        let invalid_number = match raw.invalid_number.as_deref().unwrap_or("quarantine") {
            "quarantine" => InvalidNumber::Quarantine,
            "skip" => InvalidNumber::Skip,
            "raw" => InvalidNumber::Raw,
            other => {
                self.fail(
                    "rules.invalid_number",
                    format!("`{other}` is not a policy"),
                    "use \"quarantine\", \"skip\" or \"raw\"",
                );
                InvalidNumber::Quarantine
            }
        };
        let rewrite = self.rewrites("rules.rewrite", raw.rewrite);
        let rewrite_line = self.rewrites("rules.rewrite_line", raw.rewrite_line);
        let mut crm_order = Vec::new();
        for k in raw
            .crm_order
            .unwrap_or_else(|| vec!["contact".into(), "company".into(), "lead".into()])
        {
            match k.trim().to_uppercase().as_str() {
                t @ ("CONTACT" | "COMPANY" | "LEAD") => crm_order.push(t.to_string()),
                other => self.fail(
                    "rules.crm_order",
                    format!("`{other}` is not a CRM entity type"),
                    "list some of \"contact\", \"company\", \"lead\"",
                ),
            }
        }
        let skip = raw
            .skip
            .into_iter()
            .enumerate()
            .filter_map(|(i, f)| self.filter("rules.skip", i, f, base_dir))
            .collect();
        let skip_task = raw
            .skip_task
            .into_iter()
            .enumerate()
            .filter_map(|(i, f)| self.filter("rules.skip_task", i, f, base_dir))
            .collect();
        let (hours, hours_by_group) = self.calendars(raw.hours, default_tz);
        let responsible = self.responsible(raw.responsible);
        let leads = self.leads(raw.leads, legacy);
        let fields = Fields {
            task: self.field_map("task", raw.fields.task),
            activity: self.field_map("activity", raw.fields.activity),
            lead: self.field_map("lead", raw.fields.lead),
        };
        let notify = self.notify(raw.notify);
        let lines = self.lines(raw.lines, &notify);
        let max_ops = match raw.script_max_operations {
            None => 1_000_000,
            Some(n) if (1_000..=1_000_000_000).contains(&n) => n as u64,
            Some(n) => {
                self.fail(
                    "rules.script_max_operations",
                    format!("{n} is out of range"),
                    "use 1000 to 1000000000 (default 1000000)",
                );
                1_000_000
            }
        };
        let script = raw.script.and_then(|p| {
            let path = base_dir.join(&p);
            match crate::rules::script::Script::load(&path, max_ops) {
                Ok(s) => Some(s),
                Err(e) => {
                    self.fail(
                        "rules.script",
                        e,
                        "fix the script (see README \"Business rules\")",
                    );
                    None
                }
            }
        });
        Rules {
            crm_order,
            rewrite_line,
            hours_by_group,
            lines,
            script,
            notify,
            fields,
            skip,
            skip_task,
            rewrite,
            invalid_number,
            hours,
            responsible,
            leads,
        }
    }
}
