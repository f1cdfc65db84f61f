//! What other peers send this one about its directory: greetings
//! (`_peer.hello`) and notices that its own greeting was refused
//! (`_peer.refuse`).

use std::sync::Arc;

use teleport_protocol::{from_tree, to_tree, Tree};
use teleport_server::{Context, HandlerError};

use crate::directory::{Claim, Entry};
use crate::error::{
    PeerError, Refusal, RefusalKind, DIRECTORY_FULL_TYPE, NAME_CLASH_TYPE, UNTRUSTED_TYPE,
};
use crate::greeting::{Greeting, PeerInfo, RefuseNotice};
use crate::inner::{lock, Inner};

impl Inner {
    /// `_peer.hello`: another peer connected and introduces itself. The
    /// fingerprint it greets with must be the certificate it presented in
    /// the TLS handshake, and a connection greets under one name only.
    pub(crate) async fn on_hello(
        self: Arc<Self>,
        args: Tree,
        ctx: Context,
    ) -> Result<Tree, HandlerError> {
        let bad = |message: String| HandlerError::with_type("BadGreeting", message);
        let greeting: Greeting = from_tree(args).map_err(|e| bad(e.to_string()))?;
        let info = greeting.check(Some(ctx.peer_addr().ip())).map_err(bad)?;
        let reply = || to_tree(&Greeting::of(&self.own_info())).map_err(|e| bad(e.to_string()));
        let refuse = |error: PeerError| {
            let (kind, type_name, message) = match &error {
                PeerError::NameClash { message, .. } => {
                    (RefusalKind::NameClash, NAME_CLASH_TYPE, message.clone())
                }
                PeerError::Untrusted { reason, .. } => {
                    (RefusalKind::Untrusted, UNTRUSTED_TYPE, reason.clone())
                }
                PeerError::DirectoryFull { .. } => (
                    RefusalKind::Untrusted,
                    DIRECTORY_FULL_TYPE,
                    error.to_string(),
                ),
                other => (RefusalKind::Untrusted, UNTRUSTED_TYPE, other.to_string()),
            };
            let message = format!(
                "peer {:?} refused the name {:?}: {message}",
                self.name, info.name
            );
            self.record_refusal(Refusal {
                kind,
                name: info.name.clone(),
                fingerprint: Some(info.fingerprint),
                from: Some(ctx.peer_addr()),
                refused_by: "this peer".into(),
                message: message.clone(),
            });
            HandlerError::with_type(type_name, message)
        };
        match ctx.peer_fingerprint() {
            Some(seen) if seen == info.fingerprint => {}
            seen => {
                return Err(refuse(PeerError::Untrusted {
                    name: info.name.clone(),
                    fingerprint: info.fingerprint.to_string(),
                    reason: match seen {
                        Some(seen) => format!(
                            "the greeting claims the certificate {}, but the connection \
                             presented {seen}",
                            info.fingerprint
                        ),
                        None => "the connection presented no certificate".into(),
                    },
                }))
            }
        }
        if info.name == self.name && info.fingerprint == self.fingerprint {
            // This peer connected to itself: the caller sees its own name
            // come back and refuses.
            return reply();
        }
        let connection = ctx.connection_id();
        {
            let mut greeted_by = lock(&self.greeted_by);
            match greeted_by.get(&connection) {
                Some(name) if *name != info.name => {
                    return Err(bad(format!(
                        "this connection greeted as {name:?} already; one connection, one name"
                    )))
                }
                Some(_) => {}
                None => {
                    greeted_by.insert(connection, info.name.clone());
                    drop(greeted_by);
                    self.forget_connection_when_closed(&ctx);
                }
            }
        }
        let claim = self.check_name(&info).await.map_err(&refuse)?;
        self.note_greeting(&claim, info.clone(), connection)
            .map_err(&refuse)?;
        drop(claim);
        reply()
    }

    /// When the connection of `ctx` ends, forgets the name it greeted with,
    /// and that the entry it made is connected.
    fn forget_connection_when_closed(self: &Arc<Self>, ctx: &Context) {
        let connection = ctx.connection_id();
        let closed = ctx.connection_closed();
        let inner = Arc::downgrade(self);
        self.runtime.spawn(async move {
            closed.await;
            let Some(inner) = inner.upgrade() else { return };
            let name = lock(&inner.greeted_by).remove(&connection);
            if let Some(name) = name {
                if let Some(entry) = lock(&inner.directory).get_mut(&name) {
                    if entry.greeted_on == Some(connection) {
                        entry.greeted_on = None;
                    }
                }
            }
        });
    }

    /// Remembers who greeted this peer, and where it listens. The greeting's
    /// certificate was checked against the connection's, so a greeting under
    /// the same certificate is the peer itself, telling where it is now.
    fn note_greeting(
        &self,
        claim: &Claim<'_>,
        info: PeerInfo,
        connection: u64,
    ) -> Result<(), PeerError> {
        let mut directory = lock(&self.directory);
        let closed = match directory.get_mut(&info.name) {
            Some(entry) if entry.info.fingerprint == info.fingerprint => {
                if !info.addrs.is_empty() {
                    entry.info.addrs = info.addrs;
                }
                entry.lost = false;
                entry.greeted_on = Some(connection);
                None
            }
            _ => {
                let entry = Entry {
                    info,
                    link: None,
                    lost: false,
                    greeted_on: Some(connection),
                };
                claim
                    .commit(&mut directory, entry)?
                    .and_then(|old| old.link)
            }
        };
        drop(directory);
        if let Some(old) = closed {
            old.close();
        }
        Ok(())
    }

    /// `_peer.refuse`: a peer this one connected to refused it. The notice is
    /// recorded; it changes no link (anyone who can connect can send one).
    /// Only an entry that the refusing peer's own greeting made (the
    /// connection presented its certificate) and that no link uses is
    /// forgotten: this peer would only be refused again there.
    pub(crate) async fn on_refuse(&self, args: Tree, ctx: Context) -> Result<Tree, HandlerError> {
        let bad = |message: String| HandlerError::with_type("BadRefusal", message);
        let notice: RefuseNotice = from_tree(args).map_err(|e| bad(e.to_string()))?;
        for name in [&notice.refused_by, &notice.name] {
            crate::greeting::check_name(name).map_err(bad)?;
        }
        let kind = RefusalKind::of_type(&notice.kind);
        if let Some(seen) = ctx.peer_fingerprint() {
            let mut directory = lock(&self.directory);
            let from_it = directory
                .get(&notice.refused_by)
                .is_some_and(|e| e.info.fingerprint == seen && e.link.is_none());
            if from_it {
                directory.remove(&notice.refused_by);
            }
        }
        let mut message = notice.message;
        message.truncate(1024);
        self.record_refusal(Refusal {
            kind,
            name: notice.name,
            fingerprint: Some(self.fingerprint),
            from: Some(ctx.peer_addr()),
            refused_by: notice.refused_by,
            message,
        });
        Ok(Tree::None)
    }
}
