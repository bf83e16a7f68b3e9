//! Faithful in-memory simulators of Unitalk and a Bitrix24 portal, served over HTTP on loopback.
//!
//! They ship in the binary (`ubsync sim`, `ubsync demo`) and back every integration test. Each
//! simulator keeps its state in memory behind a handle ([`UnitalkSim`], [`Bitrix24Sim`]) that
//! tests use to seed a [`Scenario`], inject faults and assert on what the "portal" holds. Their
//! behaviour follows `shared/reference/*.md`; where a test relies on a documented quirk, the
//! simulator implements the quirk rather than a convenient simplification. Time comes from a
//! [`Clock`], so tests can hold it still and move it explicitly.
//!
//! The simulators must never be reachable beyond loopback: [`serve`] refuses other addresses.

pub mod bitrix24;
pub mod scenario;
pub mod unitalk;
pub mod unitalk_webhooks;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use bitrix24::{BatchBilling, Bitrix24Sim, Bitrix24SimConfig, Fault, FaultKind};
pub use scenario::Scenario;
pub use unitalk::{UnitalkFault, UnitalkSim};

use crate::clock::Clock;

/// Lets a request handler drop its own TCP connection without answering: how the simulators
/// reproduce "the server committed the write, then the connection died".
#[derive(Clone, Default)]
pub struct ConnectionKill(Arc<Notify>);

impl ConnectionKill {
    /// Drops the connection this request arrived on; no response will be written.
    pub fn kill(&self) {
        self.0.notify_one();
    }
}

/// A simulator being served; dropping it does not stop it, [`Served::shutdown`] does.
pub struct Served {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Served {
    /// `http://addr`, no trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

/// Binds `addr` (loopback only; port 0 picks a free port) and serves `router` until shut down.
/// Each connection gets a [`ConnectionKill`] in its request extensions.
pub async fn serve(addr: SocketAddr, router: Router) -> std::io::Result<Served> {
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("simulators listen on loopback only, not {addr}"),
        ));
    }
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => { tracing::warn!(error = %e, "simulator accept failed"); continue; }
                },
                _ = stop.cancelled() => break,
            };
            let kill = ConnectionKill::default();
            let router = router.clone().layer(axum::Extension(kill.clone()));
            let stop = stop.clone();
            tokio::spawn(async move {
                let svc = hyper_util::service::TowerToHyperService::new(router);
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = kill.0.notified() => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    });
    Ok(Served { addr, shutdown })
}

/// Both simulators, seeded with one scenario and served on loopback.
pub struct Simulators {
    pub unitalk: UnitalkSim,
    pub bitrix24: Bitrix24Sim,
    pub unitalk_served: Served,
    pub bitrix24_served: Served,
}

impl Simulators {
    /// Starts both simulators on the given addresses (use port 0 in tests).
    pub async fn start(
        scenario: &Scenario,
        b24: Bitrix24SimConfig,
        clock: Clock,
        unitalk_addr: SocketAddr,
        bitrix24_addr: SocketAddr,
    ) -> std::io::Result<Self> {
        let unitalk = UnitalkSim::new(scenario, clock.clone());
        let bitrix24 = Bitrix24Sim::new(b24, clock);
        bitrix24.seed(scenario);
        let named = |what: &'static str, flag: &'static str, addr: SocketAddr| {
            move |e: std::io::Error| {
                std::io::Error::new(
                    e.kind(),
                    format!("the {what} simulator cannot listen on {addr}: {e}; pick another address with {flag}"),
                )
            }
        };
        let unitalk_served = serve(unitalk_addr, unitalk.router()).await.map_err(named(
            "Unitalk",
            "--unitalk",
            unitalk_addr,
        ))?;
        let bitrix24_served = serve(bitrix24_addr, bitrix24.router())
            .await
            .map_err(named("Bitrix24", "--bitrix24", bitrix24_addr))?;
        bitrix24.set_base_url(&bitrix24_served.base_url());
        Ok(Self {
            unitalk,
            bitrix24,
            unitalk_served,
            bitrix24_served,
        })
    }

    /// The Unitalk API base, as `unitalk.base_url` wants it.
    pub fn unitalk_url(&self) -> String {
        format!("{}/api", self.unitalk_served.base_url())
    }

    /// The portal address, as `bitrix24.portal_url` and `oauth_url` want it.
    pub fn bitrix24_url(&self) -> String {
        self.bitrix24_served.base_url()
    }

    pub fn shutdown(&self) {
        self.unitalk_served.shutdown();
        self.bitrix24_served.shutdown();
    }
}
