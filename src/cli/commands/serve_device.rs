//! `vipllava serve-device`: this machine's device for `--device remote:ws://...` clients.

use clap::Args;

/// Serve this machine's device to `--device remote:ws://HOST:PORT` clients (Burn's remote
/// backend over WebSocket: unencrypted, for trusted networks).
#[derive(Args, Debug)]
pub struct ServeDeviceArgs {
    /// Device to serve (cpu, ndarray, wgpu, vulkan, metal, cuda[:N]).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// TCP port.
    #[arg(long, default_value_t = 3000)]
    port: u16,
    /// Address to listen on; 0.0.0.0 serves the whole network.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
}

/// Runs the command.
#[cfg(feature = "remote")]
pub fn run(args: ServeDeviceArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let spec: vipllava::DeviceSpec = args.device.parse()?;
    anyhow::ensure!(
        !matches!(spec, vipllava::DeviceSpec::Remote(_)),
        "a remote device cannot be served again"
    );
    let device = spec.open()?;
    let (host, port) = (args.host.as_str(), args.port);
    let listener =
        std::net::TcpListener::bind((host, port)).with_context(|| format!("listening on {host}:{port}"))?;
    let address = listener.local_addr()?;
    eprintln!("serving {spec} at ws://{address} (Ctrl-C to stop)");
    burn::server::RemoteServer::new([device])
        .serve(burn::server::WebSocketTransport::from_listener(listener))
        .map_err(|e| anyhow::anyhow!("remote server: {e}"))
}

/// Runs the command.
#[cfg(not(feature = "remote"))]
pub fn run(args: ServeDeviceArgs) -> anyhow::Result<()> {
    let _ = (args.device, args.host, args.port);
    anyhow::bail!(
        "serve-device needs the `remote` cargo feature, which this binary was built without (rebuild with `--features remote`)"
    )
}
