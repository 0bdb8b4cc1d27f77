package testenv

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Token auth names configured in the registry and used in issued tokens.
const (
	TokenService = "streamer-test-registry"
	TokenIssuer  = "streamer-testenv"
)

// tokenServer implements the Docker token protocol (GET with basic auth and
// the OAuth2 password grant POST) for distribution's `auth: token:`.
type tokenServer struct {
	srv      *httptest.Server
	key      *ecdsa.PrivateKey
	certDER  []byte
	certPath string
	users    map[string]string
	requests atomic.Int64
}

func startTokenServer(t testing.TB, dir string, users map[string]string) (*tokenServer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate token key: %w", err)
	}
	// One self-signed certificate: the registry trusts it as its root
	// bundle and tokens carry it in their x5c header.
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: TokenIssuer},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("create token certificate: %w", err)
	}
	ts := &tokenServer{key: key, certDER: der, certPath: filepath.Join(dir, "token-root.pem"), users: users}
	if err := os.WriteFile(ts.certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return nil, fmt.Errorf("write token certificate: %w", err)
	}
	ts.srv = httptest.NewServer(http.HandlerFunc(ts.serve))
	t.Cleanup(ts.srv.Close)
	return ts, nil
}

type accessEntry struct {
	Type    string   `json:"type"`
	Name    string   `json:"name"`
	Actions []string `json:"actions"`
}

func (ts *tokenServer) serve(w http.ResponseWriter, r *http.Request) {
	ts.requests.Add(1)
	var user, pass string
	var hasCred bool
	var scopes []string
	switch r.Method {
	case http.MethodGet:
		user, pass, hasCred = r.BasicAuth()
		scopes = r.URL.Query()["scope"]
	case http.MethodPost:
		if err := r.ParseForm(); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if r.PostForm.Get("grant_type") == "password" {
			user, pass, hasCred = r.PostForm.Get("username"), r.PostForm.Get("password"), true
		}
		for _, s := range r.PostForm["scope"] {
			scopes = append(scopes, strings.Fields(s)...)
		}
	default:
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	grant := len(ts.users) == 0
	if hasCred {
		want, ok := ts.users[user]
		if !ok || subtle.ConstantTimeCompare([]byte(want), []byte(pass)) != 1 {
			w.Header().Set("WWW-Authenticate", `Basic realm="streamer-testenv"`)
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}`, http.StatusUnauthorized)
			return
		}
		grant = true
	}
	access := []accessEntry{}
	if grant {
		for _, s := range scopes {
			// type:name:actions; the name may itself contain ':' (host:port).
			i, j := strings.Index(s, ":"), strings.LastIndex(s, ":")
			if i < 0 || i == j {
				continue
			}
			access = append(access, accessEntry{Type: s[:i], Name: s[i+1 : j], Actions: strings.Split(s[j+1:], ",")})
		}
	}
	tok, err := ts.sign(user, access)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"token":        tok,
		"access_token": tok,
		"expires_in":   300,
		"issued_at":    time.Now().UTC().Format(time.RFC3339),
	})
}

func (ts *tokenServer) sign(subject string, access []accessEntry) (string, error) {
	now := time.Now()
	header, err := json.Marshal(map[string]any{
		"typ": "JWT",
		"alg": "ES256",
		"x5c": []string{base64.StdEncoding.EncodeToString(ts.certDER)},
	})
	if err != nil {
		return "", err
	}
	var jti [8]byte
	_, _ = rand.Read(jti[:])
	claims, err := json.Marshal(map[string]any{
		"iss":    TokenIssuer,
		"sub":    subject,
		"aud":    TokenService, // distribution 2.8 wants a string here
		"exp":    now.Add(5 * time.Minute).Unix(),
		"nbf":    now.Add(-time.Minute).Unix(),
		"iat":    now.Unix(),
		"jti":    fmt.Sprintf("%x", jti),
		"access": access,
	})
	if err != nil {
		return "", err
	}
	enc := base64.RawURLEncoding
	input := enc.EncodeToString(header) + "." + enc.EncodeToString(claims)
	sum := sha256.Sum256([]byte(input))
	r, s, err := ecdsa.Sign(rand.Reader, ts.key, sum[:])
	if err != nil {
		return "", err
	}
	sig := make([]byte, 64) // JWS ES256: fixed-size r || s
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return input + "." + enc.EncodeToString(sig), nil
}
