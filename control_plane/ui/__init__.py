"""The control plane's pages: the billing pages a workspace owner reaches through a signed
billing link, and the admin pages an operator signs in to with an API key. Server-rendered
(Jinja2, autoescaped), vendored CSS and a little JavaScript, no CDN."""
