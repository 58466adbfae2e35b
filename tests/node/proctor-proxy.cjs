// Routes a Node.js agent's HTTP through the proxy named by HTTP_PROXY/HTTPS_PROXY,
// with no change to the agent's code: load it with
//   NODE_OPTIONS="--require /path/to/proctor-proxy.cjs"
// next to `npm install undici@7 global-agent@4` (docs/agents.md, "Node.js").
//
// - fetch (Node's built-in, and undici's own): undici's EnvHttpProxyAgent as the global
//   dispatcher. It reads http_proxy/https_proxy/no_proxy (either case), sends the
//   credentials in the proxy URL as Proxy-Authorization, and tunnels every URL
//   (CONNECT host:port, then TLS or plain HTTP inside), which Proctor decides either way.
// - http/https modules (and clients built on them): global-agent, reading
//   HTTP_PROXY/HTTPS_PROXY/NO_PROXY (upper case) rather than its own GLOBAL_AGENT_* names.
// Proctor's CA comes from NODE_EXTRA_CA_CERTS, which Node reads at startup.
'use strict';

const { setGlobalDispatcher, EnvHttpProxyAgent } = require('undici');
setGlobalDispatcher(new EnvHttpProxyAgent());

require('global-agent').bootstrap({ environmentVariableNamespace: '' });
