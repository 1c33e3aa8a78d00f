// SemiSAM-O1: OHIF's requests to this server carry the logged-in user's bearer token.
//
// Loaded by index.html (after app-config.js, before OHIF's deferred bundle) only when the server has
// authentication on; see semisam_o1/server/ohif_login.py for why it exists. OHIF's MONAI Label panel sends
// its REST calls with a bare axios (no Authorization header), and OHIF's own DICOMweb calls use the user
// object OHIF received at login, which silent renewal does not replace. This script adds
// "Authorization: Bearer <access token>" to every XMLHttpRequest and fetch to this server's /ohif-api/ and
// /proxy/dicom/ paths (same origin only), taking the token from oidc-client-ts' user store (sessionStorage
// "oidc.user:<authority>:<client_id>", renewed tokens included). Requests elsewhere are left untouched.
(function () {
  'use strict';
  var oidc = window.config && window.config.oidc && window.config.oidc[0];
  if (!oidc) return;
  var STORE_KEY = 'oidc.user:' + oidc.authority + ':' + oidc.client_id;
  var PATHS = ['/ohif-api/', '/proxy/dicom/'];

  function accessToken() {
    try {
      var user = JSON.parse(window.sessionStorage.getItem(STORE_KEY) || 'null');
      return (user && user.access_token) || null;
    } catch (e) {
      return null;
    }
  }

  function toThisServer(url) {
    var target;
    try {
      target = new URL(String(url), window.location.href);
    } catch (e) {
      return false;
    }
    return target.origin === window.location.origin && PATHS.some(function (p) { return target.pathname.indexOf(p) === 0; });
  }

  var open = XMLHttpRequest.prototype.open;
  var setRequestHeader = XMLHttpRequest.prototype.setRequestHeader;
  var send = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.open = function (method, url) {
    this.semisamBearer = toThisServer(url);
    this.semisamAuthorization = null;
    return open.apply(this, arguments);
  };
  XMLHttpRequest.prototype.setRequestHeader = function (name, value) {
    if (this.semisamBearer && String(name).toLowerCase() === 'authorization') {
      this.semisamAuthorization = value; // set once in send(): the stored token if there is one, else this
      return undefined;
    }
    return setRequestHeader.apply(this, arguments);
  };
  XMLHttpRequest.prototype.send = function () {
    if (this.semisamBearer) {
      var token = accessToken();
      var value = token ? 'Bearer ' + token : this.semisamAuthorization;
      if (value) setRequestHeader.call(this, 'Authorization', value);
    }
    return send.apply(this, arguments);
  };

  var fetch = window.fetch;
  window.fetch = function (input, init) {
    var url = input instanceof Request ? input.url : input;
    var token = toThisServer(url) && accessToken();
    if (!token) return fetch.apply(this, arguments);
    var headers = new Headers((init && init.headers) || (input instanceof Request ? input.headers : undefined));
    headers.set('Authorization', 'Bearer ' + token);
    return fetch.call(this, input, Object.assign({}, init, { headers: headers }));
  };
})();
