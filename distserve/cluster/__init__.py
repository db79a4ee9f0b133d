"""The controller: starts instances, routes requests, drives KV migrations."""
