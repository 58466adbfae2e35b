// An unmodified agent using Node's http/https modules: node http-client.cjs '[["GET", "http://..."], ...]'
// Prints one JSON result per call. Proxy routing comes only from the environment
// (NODE_OPTIONS=--require proctor-proxy.cjs, HTTP(S)_PROXY, NODE_EXTRA_CA_CERTS).
'use strict';
const http = require('http');
const https = require('https');

function call(method, url) {
  const mod = url.startsWith('https:') ? https : http;
  return new Promise((resolve) => {
    const req = mod.request(url, { method }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => { body += chunk; });
      res.on('end', () => resolve({
        status: res.statusCode,
        decision_id: res.headers['x-proctor-decision-id'] || null,
        content_type: res.headers['content-type'] || null,
        body,
      }));
    });
    req.on('error', (e) => resolve({ error: e.message }));
    req.end();
  });
}

(async () => {
  const results = [];
  for (const [method, url] of JSON.parse(process.argv[2])) results.push(await call(method, url));
  console.log(JSON.stringify(results));
})();
