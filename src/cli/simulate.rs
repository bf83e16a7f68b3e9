//! `ubsync sim`: the simulators on fixed loopback ports, with a configuration pointing at them.

use super::*;

pub(super) async fn sim(args: SimArgs) -> anyhow::Result<u8> {
    use crate::sim::{Bitrix24SimConfig, Scenario, Simulators};
    let tz = chrono_tz::Europe::Kyiv;
    let clock = Clock::system();
    let date = args.date.unwrap_or_else(|| {
        (clock.now().with_timezone(&tz) - chrono::Duration::days(1)).date_naive()
    });
    let scenario = Scenario::call_centre_day(tz, date, args.operators, args.calls, args.seed);
    let sims = Simulators::start(
        &scenario,
        Bitrix24SimConfig::default(),
        clock,
        args.unitalk,
        args.bitrix24,
    )
    .await
    .context("cannot start the simulators")?;
    sims.unitalk.set_api_key(&args.unitalk_key);
    let (_access, refresh) = sims.bitrix24.install_app(scenario.admin_user_id);
    let b24 = sims.bitrix24_url();
    let webhook = format!(
        "{b24}/rest/1/{}/",
        crate::sim::bitrix24::DEFAULT_WEBHOOK_CODE
    );
    crate::say!(
        "Unitalk simulator   {}   (API key {})",
        sims.unitalk_url(),
        args.unitalk_key
    );
    crate::say!("Bitrix24 simulator  {b24}");
    crate::say!("  incoming webhook  {webhook}");
    crate::say!(
        "  client_id         {}",
        crate::sim::bitrix24::DEFAULT_CLIENT_ID
    );
    crate::say!(
        "  client_secret     {}",
        crate::sim::bitrix24::DEFAULT_CLIENT_SECRET
    );
    crate::say!("  refresh token     {refresh}");
    crate::say!(
        "Seeded {} operators, {} CRM clients and {} calls on {date} ({tz}).",
        scenario.operators.len(),
        scenario.crm.len(),
        scenario.calls.len()
    );
    if let Some(path) = &args.write_config {
        let mode = if args.activity {
            "activity"
        } else {
            "telephony"
        };
        let start = format!("{date} 00:00:00");
        let text = format!(
            "# Written by `ubsync sim`: points ubsync at the local simulators.\n\
             [unitalk]\nbase_url = \"{}\"\napi_key = \"{}\"\ntimezone = \"{tz}\"\n\n\
             [bitrix24]\nmode = \"{mode}\"\nportal_url = \"{b24}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\n\
             oauth_url = \"{b24}\"\nwebhook_url = \"{webhook}\"\ndefault_user_id = {}\n\n\
             [state]\npath = \"state/sim.db\"\n\n[sync]\nstart = \"{start}\"\n",
            sims.unitalk_url(),
            args.unitalk_key,
            crate::sim::bitrix24::DEFAULT_CLIENT_ID,
            crate::sim::bitrix24::DEFAULT_CLIENT_SECRET,
            scenario.admin_user_id,
        );
        crate::store::files::write_private(path, &text)
            .with_context(|| format!("cannot write {}", path.display()))?;
        crate::say!("Wrote {} ({mode} mode).", path.display());
        if !args.activity {
            crate::say!(
                "Store the tokens with:  echo {refresh} | ubsync --config {} auth set-refresh-token -",
                path.display()
            );
        }
        let c = path.display();
        crate::say!("Then, in another terminal:");
        for next in [
            "check            # the set-up, one verdict per part",
            "sync --dry-run   # what a pass would send",
            "sync             # one pass",
            "status           # what the state holds",
        ] {
            crate::say!("  ubsync --config {c} {next}");
        }
    }
    crate::say!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    sims.shutdown();
    Ok(0)
}
