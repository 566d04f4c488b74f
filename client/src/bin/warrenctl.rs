//! `warrenctl`: manage and exercise a Warren broker from the command line.
//!
//! Human-readable tables by default, `--output json` for scripts. Exit codes:
//! 0 success, 1 the broker refused the request (or a publish was returned or
//! rejected), 2 bad usage, 3 cannot connect.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value as Json, json};
use warren_client::proto::{self, ConfirmStatus};
use warren_client::{
    Client, ConnectOptions, DEFAULT_SERVER, Error, ExchangeKind, ExchangeOptions, Message, QueueOptions, Subscription, Value, ValueExt,
    parse_cli_value,
};

#[derive(Parser, Debug)]
#[command(name = "warrenctl", version, about = "Manage and exercise a Warren broker", long_about = None)]
struct Cli {
    /// The broker's gRPC address; `https://` means TLS.
    #[arg(long, global = true, env = "WARREN_SERVER", default_value = DEFAULT_SERVER)]
    server: String,

    #[command(flatten)]
    conn: ConnArgs,

    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Declare, delete and list exchanges.
    #[command(subcommand)]
    Exchange(ExchangeCmd),
    /// Declare, delete, purge and list queues.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Bind a queue or exchange to an exchange.
    Bind(BindArgs),
    /// Remove a binding.
    Unbind(BindArgs),
    /// List bindings.
    #[command(subcommand)]
    Binding(ListOnly),
    /// List consumers.
    #[command(subcommand)]
    Consumer(ListOnly),
    /// Publish one message and print its confirm.
    Publish(PublishArgs),
    /// Pull messages from a queue; prints each body on its own line.
    Get(GetArgs),
    /// Subscribe to a queue and print each body on its own line.
    Consume(ConsumeArgs),
    /// The node: identity, uptime, alarms, totals.
    Status,
    /// Users, their permissions and limits (administrator).
    #[command(subcommand)]
    User(UserCmd),
    /// Who the broker takes you for, and what you may do.
    Whoami,
    /// The cluster: members, quorum queues and their replicas.
    #[command(subcommand)]
    Cluster(ClusterCmd),
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Members (up or not, leaders and replicas each holds) and every
    /// quorum queue's leader, replicas, term and lag.
    Status,
    /// The quorum queues that would lose their majority if NODE stopped
    /// (exits 4 when there are any: stop NODE only when it exits 0).
    QuorumCritical {
        /// The node id.
        node: u64,
    },
}

/// TLS and credentials (also as WARREN_* environment variables).
#[derive(Args, Debug)]
struct ConnArgs {
    /// CA certificate(s) (PEM) to trust for the broker's certificate;
    /// implies TLS. Without it, `https://` uses the system's roots.
    #[arg(long, global = true, env = "WARREN_CA", value_name = "FILE")]
    ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --key.
    #[arg(long, global = true, env = "WARREN_CERT", value_name = "FILE")]
    cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, global = true, env = "WARREN_KEY", value_name = "FILE")]
    key: Option<std::path::PathBuf>,
    /// The name the broker's certificate must carry, when not the address's
    /// host.
    #[arg(long, global = true, env = "WARREN_TLS_SERVER_NAME", value_name = "NAME")]
    tls_server_name: Option<String>,
    #[arg(long, global = true, env = "WARREN_USERNAME", value_name = "NAME")]
    username: Option<String>,
    /// Prefer WARREN_PASSWORD (or --password-file): a flag shows in the
    /// process list.
    #[arg(long, global = true, env = "WARREN_PASSWORD", hide_env_values = true, value_name = "PASSWORD")]
    password: Option<String>,
    /// A file holding the password.
    #[arg(long, global = true, env = "WARREN_PASSWORD_FILE", value_name = "FILE", conflicts_with = "password")]
    password_file: Option<std::path::PathBuf>,
    /// A bearer token (static, or a Kubernetes ServiceAccount token).
    #[arg(long, global = true, env = "WARREN_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    token: Option<String>,
    /// A file holding a bearer token (a projected ServiceAccount token),
    /// read again as it rotates.
    #[arg(long, global = true, env = "WARREN_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
}

impl ConnArgs {
    fn options(&self) -> Result<ConnectOptions, Failure> {
        let password = match &self.password_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| usage(format!("cannot read --password-file {}: {e}", p.display())))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            None => self.password.clone(),
        };
        Ok(ConnectOptions {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            tls_server_name: self.tls_server_name.clone(),
            username: self.username.clone(),
            password,
            token: self.token.clone(),
            token_file: self.token_file.clone(),
        })
    }
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Create or replace a user. Its permissions are kept; set them with
    /// set-permissions.
    Add {
        name: String,
        /// The password (prefer --password-stdin: a flag shows in the
        /// process list).
        #[arg(long = "new-password", conflicts_with_all = ["password_stdin", "password_hash"])]
        new_password: Option<String>,
        /// Read the password from standard input (one line).
        #[arg(long)]
        password_stdin: bool,
        /// An argon2 hash (from `warrenctl user hash-password`) instead.
        #[arg(long)]
        password_hash: Option<String>,
        /// A tag: administrator (users, status, cluster operations) or
        /// monitoring (status, every list); repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Most connections open at once.
        #[arg(long)]
        max_connections: Option<u32>,
        /// Most publish and consume streams open at once.
        #[arg(long)]
        max_streams: Option<u32>,
    },
    /// Delete a user: its credentials stop working, its streams end.
    Delete { name: String },
    /// List users with their tags, permissions and limits.
    List,
    /// Set what a user (or a ServiceAccount: system:serviceaccount:NS:NAME)
    /// may configure, write and read: regular expressions over exchange and
    /// queue names ('' matches nothing, '.*' everything).
    SetPermissions {
        name: String,
        #[arg(long, default_value = "")]
        configure: String,
        #[arg(long, default_value = "")]
        write: String,
        #[arg(long, default_value = "")]
        read: String,
        /// Routing keys a publish to EXCHANGE may use; repeatable.
        #[arg(long = "topic-write", value_name = "EXCHANGE=PATTERN", value_parser = parse_raw_kv)]
        topic_write: Vec<(String, String)>,
        /// Binding keys a binding from EXCHANGE may use; repeatable.
        #[arg(long = "topic-read", value_name = "EXCHANGE=PATTERN", value_parser = parse_raw_kv)]
        topic_read: Vec<(String, String)>,
    },
    /// Remove a user's permissions.
    ClearPermissions { name: String },
    /// Print the argon2 hash of a password read from standard input, for a
    /// broker's auth file.
    HashPassword,
}

#[derive(Subcommand, Debug)]
enum ExchangeCmd {
    /// Declare an exchange (idempotent; a different existing one fails).
    Declare {
        name: String,
        #[arg(long = "type", value_parser = parse_kind)]
        kind: ExchangeKind,
        #[arg(long)]
        durable: bool,
        #[arg(long)]
        auto_delete: bool,
        #[arg(long)]
        internal: bool,
        /// An argument, such as alternate-exchange=ae; repeatable.
        #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_kv)]
        args: Vec<(String, Value)>,
    },
    /// Delete an exchange and its bindings.
    Delete {
        name: String,
        /// Fail if the exchange has bindings.
        #[arg(long)]
        if_unused: bool,
    },
    /// List exchanges.
    List,
}

#[derive(Subcommand, Debug)]
enum QueueCmd {
    /// Declare a queue (idempotent; a different existing one fails). An empty
    /// name ("") asks the broker to generate one.
    Declare {
        name: String,
        #[arg(long)]
        durable: bool,
        #[arg(long)]
        exclusive: bool,
        #[arg(long)]
        auto_delete: bool,
        /// An argument, such as x-message-ttl=5000; repeatable.
        #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_kv)]
        args: Vec<(String, Value)>,
    },
    /// Delete a queue and its messages.
    Delete {
        name: String,
        /// Fail if the queue has consumers.
        #[arg(long)]
        if_unused: bool,
        /// Fail if the queue holds messages.
        #[arg(long)]
        if_empty: bool,
    },
    /// Remove every ready message.
    Purge { name: String },
    /// List queues with their counts.
    List,
    /// Show one queue's properties and counts.
    Info { name: String },
    /// Add NODE as a replica of quorum queues that lack it (it catches up,
    /// then votes). Run it again to finish what a failure left undone.
    Grow {
        /// The node id.
        node: u64,
        /// Only queues whose name matches this regular expression.
        #[arg(long, default_value = "")]
        pattern: String,
        /// Only queues with fewer replicas than this (0: all).
        #[arg(long, default_value_t = 0)]
        below: u32,
    },
    /// Remove NODE's replica from every quorum queue that has one (works
    /// while NODE is down; never removes a queue's last replica).
    Shrink {
        /// The node id.
        node: u64,
        /// Only queues whose name matches this regular expression.
        #[arg(long, default_value = "")]
        pattern: String,
    },
    /// Move quorum queue leaders so that every live node leads about as
    /// many.
    Rebalance {
        /// Only queues whose name matches this regular expression.
        #[arg(long, default_value = "")]
        pattern: String,
    },
}

#[derive(Subcommand, Debug)]
enum ListOnly {
    List,
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("dest").required(true).args(["queue", "to_exchange"]))]
struct BindArgs {
    /// The source exchange.
    #[arg(long)]
    exchange: String,
    /// The destination queue.
    #[arg(long)]
    queue: Option<String>,
    /// The destination exchange (exchange-to-exchange binding).
    #[arg(long)]
    to_exchange: Option<String>,
    #[arg(long, default_value = "")]
    routing_key: String,
    /// A binding argument (headers to match, x-match); repeatable.
    #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_kv)]
    args: Vec<(String, Value)>,
}

#[derive(Args, Debug)]
struct PublishArgs {
    /// The exchange ("" is the default exchange: routes to the queue named by
    /// the routing key).
    #[arg(long, default_value = "")]
    exchange: String,
    #[arg(long, default_value = "")]
    routing_key: String,
    /// Write to disk before confirming (on durable queues).
    #[arg(long)]
    persistent: bool,
    /// Return the message if no queue takes it (exit code 1).
    #[arg(long)]
    mandatory: bool,
    /// A message header; repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_kv)]
    headers: Vec<(String, Value)>,
    /// A message property: content_type, content_encoding, priority,
    /// correlation_id, reply_to, expiration (ms), message_id, timestamp (ms),
    /// type, user_id, app_id, delivery_mode; repeatable. Dashes work too
    /// (message-id).
    #[arg(long = "property", value_name = "NAME=VALUE", value_parser = parse_raw_kv)]
    properties: Vec<(String, String)>,
    /// Hold the message back this many milliseconds before it is delivered.
    #[arg(long)]
    delay_ms: Option<u64>,
    /// Read the body from a file.
    #[arg(long, conflicts_with = "body")]
    file: Option<std::path::PathBuf>,
    /// The body; read from stdin when neither BODY nor --file is given.
    body: Option<String>,
}

#[derive(Args, Debug)]
struct GetArgs {
    #[arg(long)]
    queue: String,
    /// Remove the messages; without it they go back to the queue.
    #[arg(long)]
    ack: bool,
    #[arg(long, default_value_t = 1)]
    count: u32,
}

#[derive(Args, Debug)]
struct ConsumeArgs {
    #[arg(long)]
    queue: String,
    /// Stop after this many messages (default: run until interrupted).
    #[arg(long)]
    count: Option<u64>,
    #[arg(long, default_value_t = 100)]
    prefetch: u32,
    /// Auto-acknowledge: messages count as acknowledged once sent. With
    /// --count, messages are acknowledged as they are printed instead, so
    /// that no message beyond COUNT leaves the queue.
    #[arg(long)]
    no_ack: bool,
}

fn parse_kind(s: &str) -> Result<ExchangeKind, String> {
    s.parse()
}

fn parse_raw_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn parse_kv(s: &str) -> Result<(String, Value), String> {
    let (k, v) = parse_raw_kv(s)?;
    Ok((k, parse_cli_value(&v)))
}

/// A failure and the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let code = if matches!(e, Error::Connect { .. }) { 3 } else { 1 };
        Failure { code, message: e.to_string() }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure { code: 2, message: message.into() }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = Printer { mode: cli.output };
    match run(cli, &out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            let _ = std::io::stdout().flush();
            eprintln!("warrenctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli, out: &Printer) -> Result<(), Failure> {
    if let Command::User(UserCmd::HashPassword) = cli.command {
        let password = read_line("password")?;
        use argon2::password_hash::{PasswordHasher, SaltString};
        let mut salt = [0u8; 16];
        rand::Rng::fill(&mut rand::rng(), &mut salt);
        let salt = SaltString::encode_b64(&salt).map_err(|e| usage(format!("hashing failed: {e}")))?;
        let hash =
            argon2::Argon2::default().hash_password(password.as_bytes(), &salt).map_err(|e| usage(format!("hashing failed: {e}")))?;
        println!("{hash}");
        return Ok(());
    }
    let client = Client::connect_with(&cli.server, &cli.conn.options()?).await?;
    match cli.command {
        Command::Exchange(cmd) => exchange(&client, cmd, out).await,
        Command::Queue(cmd) => queue(&client, cmd, out).await,
        Command::Bind(a) => {
            let (dest, to_x) = destination(&a)?;
            client.bind(&a.exchange, &dest, to_x, &a.routing_key, a.args.into_iter().collect()).await?;
            out.done(&format!("bound {dest} to exchange '{}' with key '{}'", a.exchange, a.routing_key));
            Ok(())
        }
        Command::Unbind(a) => {
            let (dest, to_x) = destination(&a)?;
            client.unbind(&a.exchange, &dest, to_x, &a.routing_key, a.args.into_iter().collect()).await?;
            out.done(&format!("unbound {dest} from exchange '{}' with key '{}'", a.exchange, a.routing_key));
            Ok(())
        }
        Command::Binding(ListOnly::List) => {
            let rows: Vec<Json> = client.list_bindings().await?.iter().map(binding_json).collect();
            out.table(&["source", "destination", "destination_kind", "routing_key", "arguments"], &rows);
            Ok(())
        }
        Command::Consumer(ListOnly::List) => {
            let rows: Vec<Json> = client.list_consumers().await?.iter().map(consumer_json).collect();
            out.table(&["queue", "consumer_tag", "prefetch", "unacked", "auto_ack", "active", "peer"], &rows);
            Ok(())
        }
        Command::Publish(a) => publish(&client, a, out).await,
        Command::Get(a) => {
            // The broker bounds each reply by bytes: ask again until COUNT
            // messages came or the queue is empty.
            let want = a.count.max(1);
            let mut got = 0u32;
            while got < want {
                let deliveries = client.get(&a.queue, want - got, a.ack).await?;
                if deliveries.is_empty() {
                    break;
                }
                got = got.saturating_add(u32::try_from(deliveries.len()).unwrap_or(u32::MAX));
                out.bodies(&deliveries);
                if !a.ack {
                    // Without --ack the same messages would come back.
                    break;
                }
            }
            Ok(())
        }
        Command::Consume(a) => consume(&client, a, out).await,
        Command::Status => {
            let s = client.status().await?;
            out.status(&s);
            Ok(())
        }
        Command::User(cmd) => user(&client, cmd, out).await,
        Command::Whoami => {
            let w = client.users().who_am_i(proto::WhoAmIRequest {}).await.map_err(Error::from)?.into_inner();
            let row = json!({
                "user": w.user,
                "mechanism": w.mechanism,
                "tags": w.tags.join(","),
                "configure": w.permissions.as_ref().map(|p| p.configure.clone()),
                "write": w.permissions.as_ref().map(|p| p.write.clone()),
                "read": w.permissions.as_ref().map(|p| p.read.clone()),
                "authentication": w.authentication_enabled,
            });
            out.table(&["user", "mechanism", "tags", "configure", "write", "read", "authentication"], &[row]);
            Ok(())
        }
        Command::Cluster(ClusterCmd::Status) => {
            let s = client.raw().cluster_status(proto::ClusterStatusRequest {}).await.map_err(warren_client::Error::from)?.into_inner();
            let members: Vec<Json> = s
                .members
                .iter()
                .map(|m| {
                    json!({ "id": m.id, "address": m.address, "up": m.alive, "metadata": m.metadata, "leaders": m.leaders, "replicas": m.replicas })
                })
                .collect();
            let queues: Vec<Json> = s
                .queues
                .iter()
                .map(|q| {
                    json!({
                        "queue": q.name,
                        "leader": q.leader,
                        "members": q.members.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
                        "online": q.online.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
                        "term": q.term,
                        "commit_index": q.commit_index,
                        "lag": q.lag.iter().map(lag_text).collect::<Vec<_>>().join(","),
                        "last_log_index": q.last_log_index,
                        "snapshot_index": q.snapshot_index,
                        "purged_index": q.purged_index,
                    })
                })
                .collect();
            if matches!(out.mode, Output::Json) {
                println!(
                    "{}",
                    json!({
                        "node_id": s.node_id,
                        "metadata_leader": s.metadata_leader,
                        "cluster_id": s.cluster_id,
                        "metadata_current": s.metadata_current,
                        "queues_without_quorum": s.queues_without_quorum,
                        "members": members,
                        "queues": queues,
                    })
                );
            } else {
                println!(
                    "node {} (metadata leader: {}; quorum queues without a majority up: {})",
                    s.node_id, s.metadata_leader, s.queues_without_quorum
                );
                if !s.cluster_id.is_empty() || !s.metadata_current {
                    let current = if s.metadata_current { "current" } else { "not known current yet: holding requests" };
                    println!(
                        "cluster {} (this node's metadata copy: {current})",
                        if s.cluster_id.is_empty() { "unnamed" } else { &s.cluster_id }
                    );
                }
                out.table(&["id", "address", "up", "metadata", "leaders", "replicas"], &members);
                println!();
                out.table(
                    &["queue", "leader", "members", "online", "term", "commit_index", "lag", "snapshot_index", "purged_index"],
                    &queues,
                );
            }
            Ok(())
        }
        Command::Cluster(ClusterCmd::QuorumCritical { node }) => {
            let r =
                client.raw().quorum_critical(proto::QuorumCriticalRequest { node }).await.map_err(warren_client::Error::from)?.into_inner();
            let rows: Vec<Json> = r.queues.iter().map(|q| json!({ "queue": q })).collect();
            out.table(&["queue"], &rows);
            if r.queues.is_empty() {
                Ok(())
            } else {
                Err(Failure {
                    code: 4,
                    message: format!("{} quorum queue(s) would lose their majority if node {node} stopped", r.queues.len()),
                })
            }
        }
    }
}

/// One line of standard input, without its line end.
fn read_line(what: &str) -> Result<String, Failure> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| usage(format!("cannot read the {what} from stdin: {e}")))?;
    let line = line.trim_end_matches(['\r', '\n']).to_string();
    if line.is_empty() {
        return Err(usage(format!("no {what} on stdin")));
    }
    Ok(line)
}

async fn user(client: &Client, cmd: UserCmd, out: &Printer) -> Result<(), Failure> {
    let mut users = client.users();
    match cmd {
        UserCmd::Add { name, new_password, password_stdin, password_hash, tags, max_connections, max_streams } => {
            let password = if password_stdin { read_line("password")? } else { new_password.unwrap_or_default() };
            let keep_password = password.is_empty() && password_hash.is_none();
            let r = users
                .put_user(proto::PutUserRequest {
                    name: name.clone(),
                    password,
                    password_hash: password_hash.unwrap_or_default(),
                    tags,
                    max_connections,
                    max_streams,
                    keep_password,
                })
                .await
                .map_err(Error::from)?
                .into_inner();
            out.done(&format!("user '{name}' saved"));
            if r.authentication_off {
                eprintln!(
                    "warrenctl: note: this broker does not require authentication; start it with --auth (or a credential source) to enforce users"
                );
            }
        }
        UserCmd::Delete { name } => {
            let r = users.delete_user(proto::DeleteUserRequest { name: name.clone() }).await.map_err(Error::from)?.into_inner();
            out.done(&if r.existed { format!("user '{name}' deleted") } else { format!("user '{name}' did not exist") });
        }
        UserCmd::List => {
            let list = users.list_users(proto::ListUsersRequest {}).await.map_err(Error::from)?.into_inner().users;
            let rows: Vec<Json> = list
                .iter()
                .map(|u| {
                    json!({
                        "name": u.name,
                        "tags": u.tags.join(","),
                        "password": u.has_password,
                        "configure": u.permissions.as_ref().map(|p| p.configure.clone()),
                        "write": u.permissions.as_ref().map(|p| p.write.clone()),
                        "read": u.permissions.as_ref().map(|p| p.read.clone()),
                        "max_connections": u.max_connections,
                        "max_streams": u.max_streams,
                        "connections": u.connections,
                        "streams": u.streams,
                        "source": u.source,
                    })
                })
                .collect();
            out.table(&["name", "tags", "password", "configure", "write", "read", "connections", "streams", "source"], &rows);
        }
        UserCmd::SetPermissions { name, configure, write, read, topic_write, topic_read } => {
            let mut topics: std::collections::BTreeMap<String, proto::TopicPermission> = std::collections::BTreeMap::new();
            for (x, p) in topic_write {
                topics.entry(x).or_default().write = p;
            }
            for (x, p) in topic_read {
                topics.entry(x).or_default().read = p;
            }
            users
                .set_permissions(proto::SetPermissionsRequest {
                    user: name.clone(),
                    permissions: Some(proto::Permissions { configure, write, read, topics }),
                })
                .await
                .map_err(Error::from)?;
            out.done(&format!("permissions of '{name}' set"));
        }
        UserCmd::ClearPermissions { name } => {
            users.clear_permissions(proto::ClearPermissionsRequest { user: name.clone() }).await.map_err(Error::from)?;
            out.done(&format!("permissions of '{name}' cleared"));
        }
        UserCmd::HashPassword => {}
    }
    Ok(())
}

fn destination(a: &BindArgs) -> Result<(String, bool), Failure> {
    match (&a.queue, &a.to_exchange) {
        (Some(q), None) => Ok((q.clone(), false)),
        (None, Some(x)) => Ok((x.clone(), true)),
        _ => Err(usage("give exactly one of --queue and --to-exchange")),
    }
}

async fn exchange(client: &Client, cmd: ExchangeCmd, out: &Printer) -> Result<(), Failure> {
    match cmd {
        ExchangeCmd::Declare { name, kind, durable, auto_delete, internal, args } => {
            let info = client
                .declare_exchange(&name, kind, ExchangeOptions { durable, auto_delete, internal, arguments: args.into_iter().collect() })
                .await?;
            out.object(&exchange_json(&info), &format!("exchange '{}' declared", info.name));
        }
        ExchangeCmd::Delete { name, if_unused } => {
            client.delete_exchange(&name, if_unused).await?;
            out.done(&format!("exchange '{name}' deleted"));
        }
        ExchangeCmd::List => {
            let rows: Vec<Json> = client.list_exchanges().await?.iter().map(exchange_json).collect();
            out.table(&["name", "type", "durable", "auto_delete", "internal", "arguments"], &rows);
        }
    }
    Ok(())
}

async fn queue(client: &Client, cmd: QueueCmd, out: &Printer) -> Result<(), Failure> {
    match cmd {
        QueueCmd::Declare { name, durable, exclusive, auto_delete, args } => {
            let info = client
                .declare_queue(&name, QueueOptions { durable, exclusive, auto_delete, arguments: args.into_iter().collect() })
                .await?;
            out.object(&queue_json(&info), &format!("queue '{}' declared", info.name));
        }
        QueueCmd::Delete { name, if_unused, if_empty } => {
            let n = client.delete_queue(&name, if_unused, if_empty).await?;
            out.object(&json!({ "name": name, "message_count": n }), &format!("queue '{name}' deleted with {n} message(s)"));
        }
        QueueCmd::Purge { name } => {
            let n = client.purge_queue(&name).await?;
            out.object(&json!({ "name": name, "message_count": n }), &format!("queue '{name}' purged: {n} message(s) removed"));
        }
        QueueCmd::List => {
            let rows: Vec<Json> = client.list_queues().await?.iter().map(queue_json).collect();
            out.table(&["name", "ready", "unacked", "consumers"], &rows);
        }
        QueueCmd::Info { name } => {
            let info = client.queue_info(&name).await?;
            out.table(
                &["name", "type", "ready", "unacked", "delayed", "consumers", "durable", "leader", "members", "online", "arguments"],
                &[queue_json(&info)],
            );
        }
        QueueCmd::Grow { node, pattern, below } => {
            let r = client
                .raw()
                .grow_queues(proto::GrowQueuesRequest { node, queue_pattern: pattern, below })
                .await
                .map_err(Error::from)?
                .into_inner();
            return membership_result(out, &format!("grow onto node {node}"), &r);
        }
        QueueCmd::Shrink { node, pattern } => {
            let r = client
                .raw()
                .shrink_queues(proto::ShrinkQueuesRequest { node, queue_pattern: pattern })
                .await
                .map_err(Error::from)?
                .into_inner();
            return membership_result(out, &format!("shrink off node {node}"), &r);
        }
        QueueCmd::Rebalance { pattern } => {
            let r = client
                .raw()
                .rebalance_queues(proto::RebalanceQueuesRequest { queue_pattern: pattern })
                .await
                .map_err(Error::from)?
                .into_inner();
            let moves: Vec<Json> = r
                .moves
                .iter()
                .map(|m| json!({ "queue": m.queue, "from": m.from, "to": m.to, "result": if m.ok { "moved" } else { "failed" }, "error": m.error }))
                .collect();
            let leaders: Vec<Json> = r.leaders.iter().map(|(node, n)| json!({ "node": node, "leaders": n })).collect();
            let failed = r.moves.iter().filter(|m| !m.ok).count();
            if out.mode == Output::Json {
                out.emit(&json!({ "moved": r.moved, "failed": failed, "moves": moves, "leaders": leaders }).to_string());
            } else {
                out.table(&["queue", "from", "to", "result", "error"], &moves);
                println!();
                out.table(&["node", "leaders"], &leaders);
                println!("{} leadership(s) moved, {failed} failed", r.moved);
            }
            if failed > 0 {
                return Err(Failure { code: 1, message: format!("{failed} leadership move(s) failed") });
            }
        }
    }
    Ok(())
}

/// Prints one line per queue of a grow or shrink and a summary; fails
/// (exit 1) when any queue's change failed.
fn membership_result(out: &Printer, what: &str, r: &proto::MembershipChangeResponse) -> Result<(), Failure> {
    let rows: Vec<Json> = r
        .changes
        .iter()
        .map(|c| {
            json!({
                "queue": c.queue,
                "result": match (c.ok, c.changed) { (true, true) => "changed", (true, false) => "unchanged", (false, _) => "failed" },
                "members": c.members.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
                "error": c.error,
            })
        })
        .collect();
    let failed = r.changes.iter().filter(|c| !c.ok).count();
    let changed = r.changes.iter().filter(|c| c.ok && c.changed).count();
    if out.mode == Output::Json {
        out.emit(&json!({ "changed": changed, "failed": failed, "queues": rows }).to_string());
    } else {
        out.table(&["queue", "result", "members", "error"], &rows);
        println!("{what}: {} queue(s), {changed} changed, {failed} failed", r.changes.len());
    }
    if failed > 0 {
        return Err(Failure { code: 1, message: format!("{what}: {failed} queue(s) failed (run it again to finish)") });
    }
    Ok(())
}

fn properties(headers: Vec<(String, Value)>, props: Vec<(String, String)>, persistent: bool) -> Result<proto::Properties, Failure> {
    let mut p = proto::Properties { persistent, headers: headers.into_iter().collect::<BTreeMap<_, _>>(), ..Default::default() };
    let int = |name: &str, v: &str| -> Result<i64, Failure> {
        v.parse::<i64>().map_err(|_| usage(format!("property {name} must be an integer, got {v:?}")))
    };
    for (name, v) in props {
        // `message-id` and `message_id` alike: the CLI's flags are dashed,
        // the proto's fields are not.
        match name.replace('-', "_").as_str() {
            "content_type" => p.content_type = v,
            "content_encoding" => p.content_encoding = v,
            "priority" => {
                p.priority = Some(u8::try_from(int(&name, &v)?).map(u32::from).map_err(|_| usage("property priority must be 0..=255"))?)
            }
            "correlation_id" => p.correlation_id = v,
            "reply_to" => p.reply_to = v,
            "expiration" => {
                p.expiration_ms = Some(u64::try_from(int(&name, &v)?).map_err(|_| usage("property expiration must not be negative"))?)
            }
            "message_id" => p.message_id = v,
            "timestamp" => p.timestamp_ms = Some(int(&name, &v)?),
            "type" => p.r#type = v,
            "user_id" => p.user_id = v,
            "app_id" => p.app_id = v,
            "delivery_mode" => p.persistent = v == "2" || v == "persistent",
            _ => {
                return Err(usage(format!(
                    "unknown property {name:?}; known: content_type, content_encoding, priority, correlation_id, reply_to, expiration, message_id, timestamp, type, user_id, app_id, delivery_mode"
                )));
            }
        }
    }
    Ok(p)
}

async fn publish(client: &Client, a: PublishArgs, out: &Printer) -> Result<(), Failure> {
    let body: Vec<u8> = match (&a.body, &a.file) {
        (Some(b), _) => b.clone().into_bytes(),
        (None, Some(path)) => std::fs::read(path).map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?,
        (None, None) => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).map_err(|e| usage(format!("cannot read stdin: {e}")))?;
            buf
        }
    };
    let mut msg = Message::new(&a.exchange, &a.routing_key, body).properties(properties(a.headers, a.properties, a.persistent)?);
    if a.mandatory {
        msg = msg.mandatory();
    }
    if let Some(d) = a.delay_ms {
        msg = msg.delay(Duration::from_millis(d));
    }
    let c = client.publish(msg).await?;
    let text = match c.status_name() {
        "routed" => format!("routed to {} queue(s)", c.queues),
        "unroutable" => "unroutable: no queue is bound for it (dropped)".to_string(),
        other if c.reason.is_empty() => other.to_string(),
        other => format!("{other}: {}", c.reason),
    };
    out.object(&json!({ "status": c.status_name(), "queues": c.queues, "reason": c.reason }), &text);
    match ConfirmStatus::try_from(c.status) {
        Ok(ConfirmStatus::Returned) | Ok(ConfirmStatus::Rejected) => Err(Failure { code: 1, message: format!("message {text}") }),
        _ => Ok(()),
    }
}

async fn consume(client: &Client, a: ConsumeArgs, out: &Printer) -> Result<(), Failure> {
    // With --count, the broker must never hand over more than COUNT
    // messages: anything delivered beyond what is printed would come back
    // redelivered (and count toward x-delivery-limit), or, with auto-ack, be
    // lost. So --count always acknowledges manually, with a prefetch of at
    // most COUNT, and holds back the acks of the last PREFETCH messages
    // (delivered <= acked + prefetch <= count) until the end.
    let prefetch = match a.count {
        Some(n) => a.prefetch.max(1).min(u32::try_from(n).unwrap_or(u32::MAX)),
        None => a.prefetch,
    };
    let auto_ack = a.no_ack && a.count.is_none();
    let mut sub = Subscription::new(&a.queue).prefetch(prefetch);
    if auto_ack {
        sub = sub.auto_ack();
    }
    let mut consumer = client.consume(sub).await?;
    let mut seen = 0u64;
    let mut held_back: Option<u64> = None;
    while a.count.is_none_or(|n| seen < n) {
        let next = tokio::select! {
            d = consumer.next() => d?,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(d) = next else { break };
        out.bodies(std::slice::from_ref(&d));
        seen += 1;
        if auto_ack {
            continue;
        }
        match a.count {
            Some(n) if seen + u64::from(prefetch) > n => held_back = Some(d.delivery_tag),
            _ => consumer.ack(d.delivery_tag).await?,
        }
    }
    if let Some(tag) = held_back {
        consumer.ack_multiple(tag, true).await?;
    }
    // The last acknowledgements reach the broker before the stream ends.
    consumer.cancel().await?;
    Ok(())
}

// ------------------------------------------------------------------ output

fn args_json(args: &BTreeMap<String, Value>) -> Json {
    let mut keys: Vec<&String> = args.keys().collect();
    keys.sort();
    Json::Object(keys.into_iter().map(|k| (k.clone(), args[k].to_json())).collect())
}

fn exchange_json(x: &proto::ExchangeInfo) -> Json {
    let kind = ExchangeKind::from_proto(x.r#type).map_or("unknown", ExchangeKind::as_str);
    json!({
        "name": x.name,
        "type": kind,
        "durable": x.durable,
        "auto_delete": x.auto_delete,
        "internal": x.internal,
        "arguments": args_json(&x.arguments),
    })
}

fn queue_json(q: &proto::QueueInfo) -> Json {
    json!({
        "name": q.name,
        "ready": q.ready,
        "unacked": q.unacked,
        "consumers": q.consumers,
        "delayed": q.delayed,
        "ready_bytes": q.ready_bytes,
        "durable": q.durable,
        "exclusive": q.exclusive,
        "auto_delete": q.auto_delete,
        "arguments": args_json(&q.arguments),
        "type": q.queue_type,
        "leader": q.leader,
        "members": q.members.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
        "online": q.online.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
    })
}

fn binding_json(b: &proto::BindingInfo) -> Json {
    let kind = if b.destination_kind == proto::DestinationKind::Exchange as i32 { "exchange" } else { "queue" };
    json!({
        "source": b.source,
        "destination": b.destination,
        "destination_kind": kind,
        "routing_key": b.routing_key,
        "arguments": args_json(&b.arguments),
    })
}

fn consumer_json(c: &proto::ConsumerInfo) -> Json {
    json!({
        "queue": c.queue,
        "consumer_tag": c.consumer_tag,
        "prefetch": c.prefetch,
        "unacked": c.unacked,
        "auto_ack": c.auto_ack,
        "exclusive": c.exclusive,
        "priority": c.priority,
        "active": c.active,
        "peer": c.peer,
    })
}

fn delivery_json(d: &proto::Delivery) -> Json {
    let p = d.properties.clone().unwrap_or_default();
    let mut props = serde_json::Map::new();
    let mut put = |k: &str, v: Json| {
        props.insert(k.to_string(), v);
    };
    for (k, v) in [
        ("content_type", &p.content_type),
        ("content_encoding", &p.content_encoding),
        ("correlation_id", &p.correlation_id),
        ("reply_to", &p.reply_to),
        ("message_id", &p.message_id),
        ("type", &p.r#type),
        ("user_id", &p.user_id),
        ("app_id", &p.app_id),
    ] {
        if !v.is_empty() {
            put(k, json!(v));
        }
    }
    if let Some(x) = p.priority {
        put("priority", json!(x));
    }
    if let Some(x) = p.expiration_ms {
        put("expiration", json!(x));
    }
    if let Some(x) = p.timestamp_ms {
        put("timestamp", json!(x));
    }
    put("persistent", json!(p.persistent));
    let mut o = json!({
        "delivery_tag": d.delivery_tag,
        "redelivered": d.redelivered,
        "delivery_count": d.delivery_count,
        "exchange": d.exchange,
        "routing_key": d.routing_key,
        "headers": args_json(&p.headers),
        "properties": Json::Object(props),
        "message_count": d.message_count,
    });
    match std::str::from_utf8(&d.body) {
        Ok(s) => o["body"] = json!(s),
        Err(_) => o["body_bytes"] = json!(d.body.to_vec()),
    }
    o
}

fn cell(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Object(m) if m.is_empty() => String::new(),
        other => other.to_string(),
    }
}

struct Printer {
    mode: Output,
}

impl Printer {
    fn emit(&self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{text}");
    }

    /// A list: an aligned table, or a JSON array of objects.
    fn table(&self, columns: &[&str], rows: &[Json]) {
        if self.mode == Output::Json {
            self.emit(&Json::Array(rows.to_vec()).to_string());
            return;
        }
        let cells: Vec<Vec<String>> = rows.iter().map(|r| columns.iter().map(|c| cell(&r[*c])).collect()).collect();
        let widths: Vec<usize> =
            columns.iter().enumerate().map(|(i, c)| cells.iter().map(|r| r[i].chars().count()).max().unwrap_or(0).max(c.len())).collect();
        let line = |vals: Vec<String>| -> String {
            let mut s = String::new();
            for (i, v) in vals.iter().enumerate() {
                if i + 1 == vals.len() {
                    s.push_str(v);
                } else {
                    s.push_str(&format!("{v:<w$}  ", w = widths[i]));
                }
            }
            s.trim_end().to_string()
        };
        self.emit(&line(columns.iter().map(|c| c.to_uppercase()).collect()));
        for r in cells {
            self.emit(&line(r));
        }
    }

    /// One object: its JSON, or a sentence.
    fn object(&self, obj: &Json, text: &str) {
        match self.mode {
            Output::Json => self.emit(&obj.to_string()),
            Output::Table => self.emit(text),
        }
    }

    fn done(&self, text: &str) {
        self.object(&json!({ "ok": true }), text);
    }

    fn bodies(&self, deliveries: &[proto::Delivery]) {
        match self.mode {
            Output::Json => {
                for d in deliveries {
                    self.emit(&delivery_json(d).to_string());
                }
            }
            Output::Table => {
                let mut stdout = std::io::stdout().lock();
                for d in deliveries {
                    let _ = stdout.write_all(&d.body);
                    let _ = stdout.write_all(b"\n");
                }
                let _ = stdout.flush();
            }
        }
    }

    fn status(&self, s: &proto::StatusResponse) {
        let t = s.totals.unwrap_or_default();
        let alarms: Vec<Json> = s
            .alarms
            .iter()
            .map(|a| json!({ "resource": a.resource, "message": a.message, "used_bytes": a.used_bytes, "limit_bytes": a.limit_bytes }))
            .collect();
        let obj = json!({
            "node": s.node,
            "version": s.version,
            "uptime_seconds": s.uptime_seconds,
            "data_dir": s.data_dir,
            "grpc_addr": s.grpc_addr,
            "alarms": alarms,
            "totals": {
                "exchanges": t.exchanges, "queues": t.queues, "bindings": t.bindings, "consumers": t.consumers,
                "connections": t.connections, "messages_ready": t.messages_ready, "messages_unacked": t.messages_unacked,
                "messages_delayed": t.messages_delayed, "published": t.published, "delivered": t.delivered, "acked": t.acked,
            },
        });
        if self.mode == Output::Json {
            self.emit(&obj.to_string());
            return;
        }
        let alarm_text = if s.alarms.is_empty() {
            "none".to_string()
        } else {
            s.alarms.iter().map(|a| format!("{} ({})", a.resource, a.message)).collect::<Vec<_>>().join("; ")
        };
        let rows = [
            ("node", s.node.clone()),
            ("version", s.version.clone()),
            ("uptime", format!("{}s", s.uptime_seconds)),
            ("data_dir", s.data_dir.clone()),
            ("grpc_addr", s.grpc_addr.clone()),
            ("alarms", alarm_text),
            ("exchanges", t.exchanges.to_string()),
            ("queues", t.queues.to_string()),
            ("bindings", t.bindings.to_string()),
            ("consumers", t.consumers.to_string()),
            ("connections", t.connections.to_string()),
            ("messages ready", t.messages_ready.to_string()),
            ("messages unacked", t.messages_unacked.to_string()),
            ("messages delayed", t.messages_delayed.to_string()),
            ("published", t.published.to_string()),
            ("delivered", t.delivered.to_string()),
            ("acked", t.acked.to_string()),
        ];
        for (k, v) in rows {
            self.emit(&format!("{k:<17} {v}"));
        }
    }
}

/// A follower's lag as `node:entries/messages/bytes` (`node:>=...` when the
/// leader only knows a lower bound: the follower needs a snapshot).
fn lag_text(l: &proto::ReplicaLag) -> String {
    let at_least = if l.exact { "" } else { ">=" };
    format!("{}:{at_least}{}e/{}m/{}B", l.node, l.entries, l.messages, l.bytes)
}
