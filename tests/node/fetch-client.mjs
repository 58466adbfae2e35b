// An unmodified agent using Node's built-in fetch: node fetch-client.mjs '[["GET", "http://..."], ...]'
// Prints one JSON result per call. Proxy routing comes only from the environment
// (NODE_OPTIONS=--require proctor-proxy.cjs, HTTP(S)_PROXY, NODE_EXTRA_CA_CERTS).
const calls = JSON.parse(process.argv[2]);
const results = [];
for (const [method, url] of calls) {
  try {
    const r = await fetch(url, { method });
    results.push({
      status: r.status,
      decision_id: r.headers.get('x-proctor-decision-id'),
      content_type: r.headers.get('content-type'),
      body: await r.text(),
    });
  } catch (e) {
    results.push({ error: `${e.message}: ${e.cause ? e.cause.message : ''}` });
  }
}
console.log(JSON.stringify(results));
