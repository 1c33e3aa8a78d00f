// A real OpenID Connect provider (the npm package oidc-provider) for the server's authentication tests.
//
//   node tests/oidc/provider.mjs <port> [<OHIF origin> ...]
//
// prints one JSON line {"issuer": ...} on stdout once it listens on 127.0.0.1:<port>. It stands in for a
// hospital's Keycloak realm, configured the way MONAI Label expects one:
// - discovery at <issuer>/.well-known/openid-configuration, signing keys at its jwks_uri (RS256, a key
//   generated at every start);
// - access tokens are JWTs (oidc-provider's resourceIndicators feature, accessTokenFormat "jwt") that carry
//   the account's roles in Keycloak's claim `realm_access.roles`, and preferred_username/name/email;
// - the password grant Slicer's login uses through MONAI Label's /auth/token (Keycloak's "direct access
//   grants"): oidc-provider has no built-in password grant, so it is registered with its own
//   registerGrantType extension point; tokens are still oidc-provider's AccessToken, signed with its keys;
// - OHIF's login (authorization code + PKCE, a public client) for each <OHIF origin> given on the command
//   line (http://127.0.0.1:<server port>): redirect URI <origin>/ohif/callback, CORS for that origin. What
//   Keycloak does and oidc-provider leaves to its user is written here: a login form at /interaction/<uid>
//   (user name + password, checked against ACCOUNTS), consent given at once (Keycloak's first-party clients
//   ask none), refresh tokens for the code flow (reusable), and a userinfo endpoint (/me) that accepts the
//   JWT access tokens (oidc-provider's own refuses tokens issued for a resource; OHIF's oidc-client-ts always
//   asks it).
//
// Clients: "semisam-o1" (confidential, client_secret_post, 300 s tokens), "semisam-o1-short" (3 s tokens,
// for the expired-token test) and, with OHIF origins, "semisam-o1-ohif" (public: PKCE code flow for OHIF and
// the password grant for Slicer, as a Keycloak public client with "Direct access grants"; 70 s tokens).
// Accounts (username/password): annotator/annotator-pw, reviewer/reviewer-pw, admin/admin-pw,
// user/user-pw (monailabel-user only), nobody/nobody-pw (no MONAI Label role).
import { generateKeyPairSync, verify } from 'node:crypto';

import Provider, { errors } from 'oidc-provider';

const port = Number(process.argv[2] || 0);
const issuer = `http://127.0.0.1:${port}`;
const RESOURCE = 'urn:semisam-o1:api';
const OHIF_ORIGINS = process.argv.slice(3).map((origin) => new URL(origin).origin);
const OHIF_CLIENT = 'semisam-o1-ohif';

export const ACCOUNTS = {
  annotator: { password: 'annotator-pw', roles: ['monailabel-annotator'], name: 'Ann Otator' },
  reviewer: { password: 'reviewer-pw', roles: ['monailabel-reviewer'], name: 'Rev Iewer' },
  admin: { password: 'admin-pw', roles: ['monailabel-admin'], name: 'Ad Min' },
  user: { password: 'user-pw', roles: ['monailabel-user'], name: 'Us Er' },
  nobody: { password: 'nobody-pw', roles: ['offline_access'], name: 'No Body' },
};
// OHIF's tokens: 70 s, so that the browser test outlives one while oidc-client-ts renews them (60 s before they expire)
const TOKEN_TTL = { 'semisam-o1': 300, 'semisam-o1-short': 3, [OHIF_CLIENT]: 70 };

const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'test-signing-key', use: 'sig', alg: 'RS256' };

const client = (clientId) => ({
  client_id: clientId,
  client_secret: `${clientId}-secret`,
  token_endpoint_auth_method: 'client_secret_post',
  grant_types: ['password'],
  response_types: [],
  redirect_uris: [],
});

// OHIF in a browser: a public client (no secret; PKCE is required for it), as Keycloak's public client
// "monailabel-app" with the standard flow and direct access grants on.
const ohifClient = {
  client_id: OHIF_CLIENT,
  token_endpoint_auth_method: 'none',
  grant_types: ['authorization_code', 'refresh_token', 'password'],
  response_types: ['code'],
  redirect_uris: OHIF_ORIGINS.map((origin) => `${origin}/ohif/callback`),
  // OHIF's logout returns to the page it left (Keycloak: "Valid post logout redirect URIs" <origin>/ohif/*)
  post_logout_redirect_uris: OHIF_ORIGINS.flatMap((origin) => [`${origin}/ohif`, `${origin}/ohif/`]),
};

const resourceServerInfo = (oidcClient) => ({
  scope: 'openid',
  audience: RESOURCE,
  accessTokenTTL: TOKEN_TTL[oidcClient.clientId],
  accessTokenFormat: 'jwt',
  jwt: { sign: { alg: 'RS256' } },
});

const provider = new Provider(issuer, {
  clients: [client('semisam-o1'), client('semisam-o1-short'), ...(OHIF_ORIGINS.length ? [ohifClient] : [])],
  jwks: { keys: [jwk] },
  features: {
    devInteractions: { enabled: false },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => RESOURCE,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resourceIndicator, oidcClient) => {
        if (resourceIndicator !== RESOURCE) throw new errors.InvalidTarget();
        return resourceServerInfo(oidcClient);
      },
    },
  },
  ttl: {
    AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL ?? 300,
  },
  claims: { openid: ['sub'], profile: ['name', 'preferred_username'], email: ['email'] },
  // Keycloak gives the code flow a refresh token (oidc-provider: only with the offline_access scope), and
  // by default it may be used again ("Revoke Refresh Token" off; oidc-provider: rotated for public clients,
  // and a second use revokes the grant)
  issueRefreshToken: (ctx, oidcClient) => oidcClient.grantTypeAllowed('refresh_token'),
  rotateRefreshToken: false,
  // Keycloak's claims: what MONAI Label reads (preferred_username, name, email, realm_access.roles)
  extraTokenClaims: (ctx, token) => {
    const account = ACCOUNTS[token.accountId];
    if (!account) return undefined;
    return {
      preferred_username: token.accountId,
      name: account.name,
      email: `${token.accountId}@hospital.test`,
      realm_access: { roles: account.roles },
    };
  },
  findAccount: (ctx, id) => (ACCOUNTS[id] ? { accountId: id, claims: () => profile(id) } : undefined),
});

function profile(id) {
  return { sub: id, preferred_username: id, name: ACCOUNTS[id].name, email: `${id}@hospital.test` };
}

const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function loginPage(uid, clientId, error = '') {
  return `<!doctype html><html><head><meta charset="utf-8"><title>Log in: test identity provider</title></head><body>
<h1>Log in to SemiSAM-O1</h1><p>client ${escapeHtml(clientId)}</p>
${error ? `<p id="error" style="color:red">${escapeHtml(error)}</p>` : ''}
<form method="post" action="/interaction/${escapeHtml(uid)}/login" autocomplete="off">
<label>User name <input id="username" name="username" required autofocus></label>
<label>Password <input id="password" name="password" type="password" required></label>
<button id="login" type="submit">Log in</button></form></body></html>`;
}

async function formBody(req) {
  let body = '';
  for await (const chunk of req) body += chunk;
  return new URLSearchParams(body);
}

// The claims of an access token this provider signed (RS256 with its key, its issuer, not expired), or null.
function verifiedClaims(token) {
  const [header, payload, signature] = String(token).split('.');
  if (!signature) return null;
  const signed = verify('RSA-SHA256', Buffer.from(`${header}.${payload}`), publicKey, Buffer.from(signature, 'base64url'));
  const claims = signed && JSON.parse(Buffer.from(payload, 'base64url'));
  return claims && claims.iss === issuer && claims.exp > Date.now() / 1000 ? claims : null;
}

provider.use(async (ctx, next) => {
  // userinfo (/me) for the JWT access tokens, with CORS for OHIF's origins (as Keycloak's web origins)
  if (ctx.path === '/me') {
    const origin = ctx.get('origin');
    if (OHIF_ORIGINS.includes(origin)) {
      ctx.set('Access-Control-Allow-Origin', origin);
      ctx.set('Access-Control-Allow-Headers', 'Authorization');
      ctx.set('Vary', 'Origin');
    }
    if (ctx.method === 'OPTIONS') {
      ctx.status = 204;
      return;
    }
    const claims = verifiedClaims((ctx.get('authorization').match(/^Bearer (.+)$/) || [])[1]);
    if (!claims || !ACCOUNTS[claims.sub]) {
      ctx.status = 401;
      ctx.set('WWW-Authenticate', 'Bearer error="invalid_token"');
      ctx.body = { error: 'invalid_token' };
      return;
    }
    ctx.body = profile(claims.sub);
    return;
  }
  // the login form, and consent given at once (first-party client)
  const interaction = ctx.path.match(/^\/interaction\/([^/]+)(\/login)?$/);
  if (!interaction) {
    await next();
    return;
  }
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  const { uid, prompt, params } = details;
  if (prompt.name === 'login' && ctx.method === 'POST' && interaction[2]) {
    const form = await formBody(ctx.req);
    const account = ACCOUNTS[form.get('username')];
    if (!account || account.password !== form.get('password')) {
      ctx.status = 401;
      ctx.type = 'html';
      ctx.body = loginPage(uid, params.client_id, 'Invalid user name or password.');
      return;
    }
    ctx.status = 303;
    ctx.redirect(await provider.interactionResult(ctx.req, ctx.res, { login: { accountId: form.get('username') } }, { mergeWithLastSubmission: false }));
    return;
  }
  if (prompt.name === 'login') {
    ctx.type = 'html';
    ctx.body = loginPage(uid, params.client_id);
    return;
  }
  if (prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
    if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
    if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(prompt.details.missingResourceScopes || {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    ctx.status = 303;
    ctx.redirect(await provider.interactionResult(ctx.req, ctx.res, { consent: details.grantId ? {} : { grantId } }, { mergeWithLastSubmission: true }));
    return;
  }
  ctx.throw(400, `unexpected prompt ${prompt.name}`);
});

// The resource owner password credentials grant (RFC 6749 section 4.3), as Keycloak answers it.
provider.registerGrantType('password', async (ctx) => {
  const { client: oidcClient, params } = ctx.oidc;
  const account = ACCOUNTS[params.username];
  if (!account || account.password !== params.password) {
    throw new errors.InvalidGrant('invalid user credentials');
  }
  const token = new provider.AccessToken({
    accountId: params.username,
    client: oidcClient,
    gty: 'password',
    scope: 'openid',
  });
  token.resourceServer = new provider.ResourceServer(RESOURCE, resourceServerInfo(oidcClient));
  ctx.oidc.entity('AccessToken', token);
  const value = await token.save();
  ctx.body = {
    access_token: value,
    token_type: token.tokenType,
    expires_in: token.expiration,
    scope: token.scope,
  };
}, ['username', 'password', 'scope']);

const server = provider.listen(port, '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
