//! The command line's shape (clap): commands, their options and their `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::ColorChoice;

#[derive(Debug, Parser)]
#[command(
    name = "ubsync",
    version,
    about = "Keeps Bitrix24 CRM in step with the Unitalk cloud PBX",
    long_about = "ubsync pulls call history and inner-line statuses from Unitalk, diffs them against a local \
SQLite state store, and pushes calls, recordings and missed-call tasks to Bitrix24 in rate-limited batches.\n\n\
Start with `ubsync sim --write-config sim.toml` to try it against the built-in simulators, or copy \
ubsync.example.toml to ubsync.toml, fill it in and run `ubsync check`.\n\n\
Exit codes: 0 success, 1 other errors, 2 usage or configuration error, 3 reconcile found differences it did not \
repair, 4 sync failing for longer than health.max_age, 75 upstream temporarily unavailable (retry later)."
)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "UBSYNC_CONFIG",
        default_value = "ubsync.toml",
        value_name = "PATH"
    )]
    pub config: PathBuf,

    /// More logging (-v debug, -vv trace). UBSYNC_LOG overrides, e.g. UBSYNC_LOG=ubsync=debug.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only warnings and errors.
    #[arg(long, short = 'q', global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Coloured log lines: auto (on a terminal, unless NO_COLOR is set), always or never. Under
    /// journald, lines carry syslog priorities instead (`journalctl -p warning` works).
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto, value_name = "WHEN")]
    pub color: ColorChoice,

    #[command(subcommand)]
    pub command: Command,

    /// Whether `--config` was given on the command line (`demo` and `sim` use none).
    #[arg(skip)]
    pub config_given: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration, open the state store, and make one cheap authenticated request
    /// to Unitalk and to Bitrix24, printing a verdict for each. The portal's address is tried
    /// first (a name that does not resolve, a port that refuses), and in telephony mode a token
    /// refresh proves client_id and client_secret (the new pair is stored).
    Check {
        /// Skip the requests to Unitalk and Bitrix24.
        #[arg(long)]
        offline: bool,
    },
    /// Run one sync pass: pull new Unitalk calls, push them to Bitrix24, create missed-call tasks.
    /// This is what the systemd timer runs. Ends with a one-line summary.
    Sync {
        /// Print the commands that would be sent, per call, and write nothing to Bitrix24. The
        /// lookups a real pass makes first (verify-first, probes) are made (reads only) and
        /// listed as `lookup call ID:` lines. The pass plans on an in-memory copy of the state:
        /// the state file is left byte for byte as it was (only a refreshed OAuth token pair is
        /// stored, since Bitrix24 voids the old one at once).
        #[arg(long)]
        dry_run: bool,
    },
    /// Run as a daemon: the jobs of the schedule file ([schedule] file) one at a time, until
    /// SIGTERM or Ctrl-C. The long-running alternative to the systemd timer.
    Run {
        /// Serve GET /healthz, GET /metrics (Prometheus) and GET /status on this address, e.g.
        /// 127.0.0.1:9187. Events in are added when configured: POST /unitalk/webhook/<secret>
        /// ([webhooks] unitalk_secret) and POST /bitrix24/events ([webhooks] bitrix24_events,
        /// online route); put them behind an HTTPS reverse proxy. The install callback
        /// (POST /install) is added only with `[http] install = true`.
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Serve only the local application's install callback (POST /install) on this separate
        /// address, e.g. 127.0.0.1:8089, to put behind an HTTPS reverse proxy (telephony mode).
        #[arg(long, value_name = "ADDR")]
        install_listen: Option<SocketAddr>,
    },
    /// Show the cursor, the last run of each kind, calls by stage, follow-ups, quarantined calls
    /// and inner-line statuses. Times in the account's zone (`--json`: UTC). The daemon serves
    /// the same JSON at GET /status.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// One call's story: the Unitalk record, its ledger stage, Bitrix24 ids (call, activity,
    /// task, CRM entity), attempts, errors, quarantine and recording state.
    Show {
        /// A Unitalk call id, an EXTERNAL_CALL_ID (unitalk-<id>) or a phone number (every call
        /// of that number, newest first).
        call: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The run log, newest first: every sync, backfill, reconcile, retry and events run, with what it did
    /// (the daemon's jobs included; a run killed mid-way shows as "running (or killed)").
    Runs {
        /// Only runs of this kind.
        #[arg(long, value_parser = ["sync", "backfill", "reconcile", "retry", "events"])]
        kind: Option<String>,
        /// How many runs to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Re-attempt quarantined calls (by Unitalk call id), then run a pass.
    Retry {
        /// Unitalk call ids, as `ubsync status` lists them.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every quarantined call.
        #[arg(long)]
        all: bool,
    },
    /// Prove that Bitrix24 holds every call of a stretch of time exactly once, and repair what is
    /// missing (calls and missed-call tasks). Never deletes anything in the portal: duplicates
    /// are reported for a human. Prints a table and writes a JSON report under state/reports/.
    Reconcile {
        /// First day (default: yesterday in Unitalk's zone).
        #[arg(long, value_name = "DATE")]
        from: Option<String>,
        /// Last day, inclusive (default: the same as --from).
        #[arg(long, value_name = "DATE")]
        to: Option<String>,
        /// Report only; repair nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Migrate history on a first install: push every call from --from to --to. Resumable: after
    /// a crash or Ctrl-C, run the same command again and it continues from its last finished
    /// window. Shows a progress bar on a terminal and plain progress lines otherwise.
    Backfill {
        /// First day (or date-time, or RFC 3339) to push, in Unitalk's zone.
        #[arg(long, value_name = "DATE")]
        from: String,
        /// Last day to push (inclusive; a date-time is exclusive).
        #[arg(long, value_name = "DATE")]
        to: String,
    },
    /// Try ubsync end to end: start both simulators with a seeded call-centre day (including a DST
    /// change), run the real pipeline over real HTTP at the standard plan's limits, and check the
    /// simulated portal against the expected outcome. Needs no configuration.
    Demo,
    /// Run the Unitalk and Bitrix24 simulators on loopback, seeded with a realistic call-centre day.
    Sim(SimArgs),
    /// Manage the Bitrix24 OAuth tokens of the local application (telephony mode).
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Each Unitalk inner line: its status and since when, its operator, and the Bitrix24 user
    /// it maps to (UF_PHONE_INNER), flagging lines without a user and Bitrix24 users whose
    /// extension is no Unitalk line. Reads the state file (a pass or the daemon's `lines` job
    /// refreshes it) and, unless --offline, lists the portal's users.
    Lines {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Read only the state file; do not ask Bitrix24 for its users.
        #[arg(long)]
        offline: bool,
    },
    /// Try the business rules ([rules], [tasks]) on calls already in the state file.
    #[command(subcommand)]
    Rules(RulesCommand),
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Run the rules over stored calls and print, per call, which rules fired and what would be
    /// sent (the client number as rewritten, skip or push, the task's title, deadline and
    /// whether it is folded into the client's open task). Sends and writes nothing, so a rule
    /// can be tried before it is enabled: edit the config, run this, read.
    Test {
        /// First day (default: today in Unitalk's zone).
        #[arg(long, value_name = "DATE", conflicts_with = "call")]
        from: Option<String>,
        /// Last day, inclusive (default: the same as --from).
        #[arg(long, value_name = "DATE", conflicts_with = "call")]
        to: Option<String>,
        /// One call (Unitalk id or unitalk-<id>).
        #[arg(long, value_name = "ID")]
        call: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Receive the local application's install callback and store its tokens. Set the
    /// application's "installation path" to this address (behind your HTTPS reverse proxy), then
    /// add or reinstall the application in the portal.
    Serve {
        /// Address to listen on, e.g. 127.0.0.1:8089 (port 0 picks one; the address is printed).
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        /// Exit after the first successful install.
        #[arg(long)]
        once: bool,
    },
    /// Exchange a refresh token for a fresh token pair and store it. Use this when the install
    /// callback cannot reach ubsync: copy the refresh token from the application's install data.
    /// The token is read from standard input (`-`, the default), a file (--token-file) or the
    /// environment variable UBSYNC_REFRESH_TOKEN; on the command line it would land in shell
    /// history and `ps`.
    SetRefreshToken {
        /// `-` (the default) reads the token from standard input. A token given here works but
        /// is visible to other users in `ps`: ubsync warns.
        token: Option<String>,
        /// Read the token from this file.
        #[arg(long, value_name = "PATH", conflicts_with = "token")]
        token_file: Option<PathBuf>,
    },
    /// Forget the address a portal was remembered to have moved to (after a redirect), so
    /// requests go to the configured address again.
    ForgetRedirect,
    /// Forget the stored install (tokens, member and application token), e.g. before
    /// reinstalling the application; the next install callback is then accepted as a first one.
    ForgetInstall,
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Address of the Unitalk simulator (loopback only).
    #[arg(long, default_value = "127.0.0.1:18081")]
    pub unitalk: SocketAddr,
    /// Address of the Bitrix24 simulator (loopback only).
    #[arg(long, default_value = "127.0.0.1:18082")]
    pub bitrix24: SocketAddr,
    /// Local day of the seeded calls (default: yesterday in Europe/Kyiv).
    #[arg(long, value_name = "YYYY-MM-DD")]
    pub date: Option<chrono::NaiveDate>,
    /// Number of seeded calls.
    #[arg(long, default_value_t = 400)]
    pub calls: usize,
    /// Number of seeded operators.
    #[arg(long, default_value_t = 20)]
    pub operators: usize,
    /// Seed of the scenario generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write a ubsync configuration pointing at the simulators to this file (the state file goes
    /// beside it, in state/).
    #[arg(long, value_name = "PATH")]
    pub write_config: Option<PathBuf>,
    /// Configure the written file for activity mode (incoming webhook) instead of telephony mode.
    #[arg(long)]
    pub activity: bool,
    /// The API key the Unitalk simulator accepts.
    #[arg(long, value_name = "KEY", default_value = crate::sim::unitalk::DEFAULT_API_KEY)]
    pub unitalk_key: String,
}
