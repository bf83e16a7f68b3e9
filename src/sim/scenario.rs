//! Seeded scenarios: a call centre's operators, CRM clients and a day of calls.
//!
//! One [`Scenario`] seeds both simulators, so the Unitalk operators' inner lines match the
//! Bitrix24 users' `UF_PHONE_INNER`, and some callers are known CRM contacts, leads or companies.
//! Generation is deterministic for a given seed.

use chrono::{Duration, NaiveDate, NaiveDateTime, NaiveTime};
use chrono_tz::Tz;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A call-centre operator: a Unitalk user with an inner line, and the Bitrix24 user behind it.
#[derive(Debug, Clone)]
pub struct Operator {
    pub b24_user_id: u64,
    pub unitalk_user_id: u64,
    pub first_name: String,
    pub last_name: String,
    pub inner_line: String,
    pub email: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrmKind {
    Contact,
    Lead,
    Company,
}

impl CrmKind {
    /// `CONTACT`, `LEAD`, `COMPANY`.
    pub fn as_str(self) -> &'static str {
        match self {
            CrmKind::Contact => "CONTACT",
            CrmKind::Lead => "LEAD",
            CrmKind::Company => "COMPANY",
        }
    }
}

/// A CRM client the portal already knows.
#[derive(Debug, Clone)]
pub struct CrmSeed {
    pub kind: CrmKind,
    pub id: u64,
    pub name: String,
    /// As stored in the portal, international with `+`.
    pub phone: String,
    pub responsible_id: u64,
}

/// One call in Unitalk's history. `date` is wall-clock in the scenario's zone, like Unitalk's.
#[derive(Debug, Clone)]
pub struct SimCall {
    pub id: u64,
    pub date: NaiveDateTime,
    pub direction: String,
    pub from: String,
    pub to: Vec<String>,
    pub outer_number: String,
    pub seconds_full: u32,
    pub seconds_talk: u32,
    pub state: String,
    pub cause: Option<u32>,
    pub link: Option<String>,
    /// The recording link shows up this long after the call ends.
    pub link_delay: Duration,
    pub source: String,
    /// `lastGroupName`, sent when set.
    pub group: Option<String>,
    /// `meta` as given to `phones/directCall`, sent when set (whether Unitalk echoes it is
    /// unconfirmed: the simulator does only when asked to).
    pub meta: Option<String>,
    /// Served verbatim instead of the fields above (for malformed-record tests); `date` and
    /// `seconds_full` still decide when it becomes visible.
    pub raw_override: Option<serde_json::Value>,
    /// Served as older Unitalk records are: `state` and `secondsFullTime` null, `secondsTalk`
    /// null when no one talked; only `cause` tells the outcome.
    pub older_format: bool,
}

/// Everything both simulators are seeded with.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub timezone: Tz,
    /// The portal administrator, and the natural `bitrix24.default_user_id`.
    pub admin_user_id: u64,
    pub operators: Vec<Operator>,
    pub crm: Vec<CrmSeed>,
    pub calls: Vec<SimCall>,
    /// The company's external numbers (Unitalk `outerNumber`, Bitrix24 `LINE_NUMBER`).
    pub outer_numbers: Vec<String>,
}

const FIRST: &[&str] = &[
    "Olena", "Ivan", "Maria", "Petro", "Oksana", "Andrii", "Iryna", "Taras", "Sofiia", "Dmytro",
    "Kateryna", "Mykola", "Yulia", "Serhii", "Nataliia", "Oleh", "Halyna", "Bohdan", "Larysa",
    "Vasyl",
];
const LAST: &[&str] = &[
    "Shevchenko",
    "Kovalenko",
    "Bondarenko",
    "Tkachenko",
    "Kravchenko",
    "Boyko",
    "Melnyk",
    "Lysenko",
    "Marchenko",
    "Rudenko",
    "Savchenko",
    "Petrenko",
    "Moroz",
    "Pavlenko",
    "Levchenko",
    "Kharchenko",
];

impl Scenario {
    /// No operators, clients or calls: a base for hand-built test cases.
    pub fn empty(timezone: Tz) -> Self {
        Self {
            timezone,
            admin_user_id: 1,
            operators: Vec::new(),
            crm: Vec::new(),
            calls: Vec::new(),
            outer_numbers: vec!["380443334455".into()],
        }
    }

    /// Adds an operator with the given Bitrix24 user id and inner line.
    pub fn with_operator(mut self, b24_user_id: u64, inner_line: &str) -> Self {
        let i = self.operators.len();
        self.operators.push(Operator {
            b24_user_id,
            unitalk_user_id: 500 + i as u64,
            first_name: FIRST[i % FIRST.len()].into(),
            last_name: LAST[i % LAST.len()].into(),
            inner_line: inner_line.into(),
            email: format!("op{b24_user_id}@example.com"),
        });
        self
    }

    /// Adds a known CRM client.
    pub fn with_client(mut self, kind: CrmKind, id: u64, phone: &str, responsible_id: u64) -> Self {
        self.crm.push(CrmSeed {
            kind,
            id,
            name: format!("{} {id}", kind.as_str().to_lowercase()),
            phone: phone.into(),
            responsible_id,
        });
        self
    }

    /// A realistic day in a call centre: `operators` operators on lines 101.., a few hundred CRM
    /// clients, and `calls` calls between 08:00 and 20:00 local time on `date`: incoming and
    /// outgoing, answered, missed and busy, some internal, some from unknown or national-format
    /// numbers, recordings for answered calls (some appearing minutes late).
    pub fn call_centre_day(
        tz: Tz,
        date: NaiveDate,
        operators: usize,
        calls: usize,
        seed: u64,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut s = Self::empty(tz);
        s.outer_numbers = vec![
            "380443334455".into(),
            "380443334466".into(),
            "380673334477".into(),
        ];
        for i in 0..operators {
            s = s.with_operator(10 + i as u64, &(101 + i).to_string());
        }
        let kinds = [
            CrmKind::Contact,
            CrmKind::Contact,
            CrmKind::Contact,
            CrmKind::Lead,
            CrmKind::Company,
        ];
        for i in 0..(operators * 12).max(10) {
            let kind = kinds[i % kinds.len()];
            let responsible = if operators == 0 {
                1
            } else {
                10 + rng.random_range(0..operators) as u64
            };
            let phone = format!("+38050{:07}", 1_000_000 + i * 7919 % 9_000_000);
            let id = 200 + i as u64;
            s = s.with_client(kind, id, &phone, responsible);
        }
        let day_start = date.and_time(NaiveTime::from_hms_opt(8, 0, 0).expect("valid time"));
        let mut id = (date.num_days_from_ce() as u64 % 10_000) * 100_000;
        let mut starts: Vec<i64> = (0..calls).map(|_| rng.random_range(0..12 * 3600)).collect();
        starts.sort_unstable();
        for offset in starts {
            id += 1 + rng.random_range(0..3);
            let date = day_start + Duration::seconds(offset);
            let roll: f64 = rng.random();
            let direction = if roll < 0.68 {
                "IN"
            } else if roll < 0.95 {
                "OUT"
            } else {
                "INNER"
            };
            let op_line = if operators == 0 {
                "100".to_string()
            } else {
                s.operators[rng.random_range(0..operators)]
                    .inner_line
                    .clone()
            };
            let client = {
                let r: f64 = rng.random();
                if r < 0.55 && !s.crm.is_empty() {
                    s.crm[rng.random_range(0..s.crm.len())]
                        .phone
                        .trim_start_matches('+')
                        .to_string()
                } else if r < 0.62 {
                    format!("050{:07}", rng.random_range(1_000_000..9_999_999))
                } else {
                    format!("38067{:07}", rng.random_range(1_000_000..9_999_999))
                }
            };
            let state = pick_state(&mut rng, direction);
            let answered = state == "ANSWER";
            let talk = if answered {
                rng.random_range(15..900)
            } else {
                0
            };
            let ring = rng.random_range(3..45);
            let (from, to) = match direction {
                "IN" => {
                    let to = if answered || rng.random_bool(0.5) {
                        vec![op_line.clone()]
                    } else {
                        vec![]
                    };
                    (client, to)
                }
                "OUT" => (op_line.clone(), vec![client]),
                _ => (
                    op_line.clone(),
                    vec![(101 + rng.random_range(0..operators.max(1))).to_string()],
                ),
            };
            let link = answered.then(|| {
                format!(
                    "https://api.unitalk.cloud:8443/tracking/rec/{}.{}/{}",
                    1_700_000_000 + offset,
                    id % 1000,
                    date.format("%Y-%m-%d")
                )
            });
            let link_delay = if answered && rng.random_bool(0.25) {
                Duration::minutes(5)
            } else {
                Duration::zero()
            };
            s.calls.push(SimCall {
                id,
                date,
                direction: direction.into(),
                from,
                to,
                outer_number: s.outer_numbers[rng.random_range(0..s.outer_numbers.len())].clone(),
                seconds_full: ring + talk,
                seconds_talk: talk,
                cause: Some(if answered { 16 } else { 19 }),
                state: state.into(),
                link,
                link_delay,
                source: "REGULAR".into(),
                raw_override: None,
                older_format: false,
                group: None,
                meta: None,
            });
        }
        s
    }

    /// Adds one call and returns its id (one more than the largest so far).
    #[allow(clippy::too_many_arguments)]
    pub fn add_call(
        &mut self,
        date: NaiveDateTime,
        direction: &str,
        from: &str,
        to: &[&str],
        state: &str,
        seconds_talk: u32,
        link: Option<&str>,
    ) -> u64 {
        let id = self.calls.iter().map(|c| c.id).max().unwrap_or(1000) + 1;
        self.calls.push(SimCall {
            id,
            date,
            direction: direction.into(),
            from: from.into(),
            to: to.iter().map(|s| s.to_string()).collect(),
            outer_number: self.outer_numbers[0].clone(),
            seconds_full: seconds_talk + 10,
            seconds_talk,
            state: state.into(),
            cause: Some(16),
            link: link.map(str::to_string),
            link_delay: Duration::zero(),
            source: "REGULAR".into(),
            raw_override: None,
            older_format: false,
            group: None,
            meta: None,
        });
        id
    }
}

fn pick_state(rng: &mut StdRng, direction: &str) -> &'static str {
    let r: f64 = rng.random();
    match direction {
        "IN" => match r {
            r if r < 0.64 => "ANSWER",
            r if r < 0.84 => "NOANSWER",
            r if r < 0.92 => "BUSY",
            r if r < 0.96 => "FAIL",
            _ => "CHANUNAVAIL",
        },
        "OUT" => match r {
            r if r < 0.58 => "ANSWER",
            r if r < 0.76 => "NOANSWER",
            r if r < 0.84 => "BUSY",
            r if r < 0.87 => "BUSYOUT",
            r if r < 0.90 => "UNREACHABLE",
            r if r < 0.92 => "NOMONEY",
            r if r < 0.94 => "WRONGDIR",
            r if r < 0.96 => "BLOCKED",
            r if r < 0.98 => "NOT_EXIST",
            _ => "FAIL",
        },
        _ => {
            if r < 0.8 {
                "ANSWER"
            } else {
                "NOANSWER"
            }
        }
    }
}

use chrono::Datelike;
