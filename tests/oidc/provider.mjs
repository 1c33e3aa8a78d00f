// A real OpenID Connect provider (the npm package oidc-provider) for the server's authentication tests.
//
//   node tests/oidc/provider.mjs <port>
//
// prints one JSON line {"issuer": ...} on stdout once it listens on 127.0.0.1:<port>. It stands in for a
// hospital's Keycloak realm, configured the way MONAI Label expects one:
// - discovery at <issuer>/.well-known/openid-configuration, signing keys at its jwks_uri (RS256, a key
//   generated at every start);
// - access tokens are JWTs (oidc-provider's resourceIndicators feature, accessTokenFormat "jwt") that carry
//   the account's roles in Keycloak's claim `realm_access.roles`, and preferred_username/name/email;
// - the password grant Slicer's login uses through MONAI Label's /auth/token (Keycloak's "direct access
//   grants"): oidc-provider has no built-in password grant, so it is registered with its own
//   registerGrantType extension point; tokens are still oidc-provider's AccessToken, signed with its keys.
//
// Clients: "semisam-o1" (confidential, client_secret_post, 300 s tokens) and "semisam-o1-short" (3 s tokens,
// for the expired-token test). Accounts (username/password): annotator/annotator-pw, reviewer/reviewer-pw,
// admin/admin-pw, nobody/nobody-pw (no MONAI Label role).
import { generateKeyPairSync } from 'node:crypto';

import Provider, { errors } from 'oidc-provider';

const port = Number(process.argv[2] || 0);
const issuer = `http://127.0.0.1:${port}`;
const RESOURCE = 'urn:semisam-o1:api';

export const ACCOUNTS = {
  annotator: { password: 'annotator-pw', roles: ['monailabel-annotator'], name: 'Ann Otator' },
  reviewer: { password: 'reviewer-pw', roles: ['monailabel-reviewer'], name: 'Rev Iewer' },
  admin: { password: 'admin-pw', roles: ['monailabel-admin'], name: 'Ad Min' },
  nobody: { password: 'nobody-pw', roles: ['offline_access'], name: 'No Body' },
};
const TOKEN_TTL = { 'semisam-o1': 300, 'semisam-o1-short': 3 };

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'test-signing-key', use: 'sig', alg: 'RS256' };

const client = (clientId) => ({
  client_id: clientId,
  client_secret: `${clientId}-secret`,
  token_endpoint_auth_method: 'client_secret_post',
  grant_types: ['password'],
  response_types: [],
  redirect_uris: [],
});

const resourceServerInfo = (oidcClient) => ({
  scope: 'openid',
  audience: RESOURCE,
  accessTokenTTL: TOKEN_TTL[oidcClient.clientId],
  accessTokenFormat: 'jwt',
  jwt: { sign: { alg: 'RS256' } },
});

const provider = new Provider(issuer, {
  clients: [client('semisam-o1'), client('semisam-o1-short')],
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
  findAccount: (ctx, id) => (ACCOUNTS[id] ? { accountId: id, claims: () => ({ sub: id }) } : undefined),
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
